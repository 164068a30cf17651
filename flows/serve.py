"""Serve the champion: `make serve` / `python -m flows.serve`.

Resolves `models:/<export.model_name>@<promote.alias>` in the MLflow registry (or --version N,
or --alias NAME), downloads that version, verifies the sha256 of every file against the table
the registry pinned at export (a mismatch refuses to serve and names the file), starts vLLM's
OpenAI-compatible server from .venv-vllm (`make install-vllm`) with the CPU flags when no GPU
is visible, waits until it answers, and prints the URL and ready-to-paste curl commands, with
thinking on and off (`chat_template_kwargs: {enable_thinking: false}` per request; a `/no_think`
at the end of the user turn does the same). It then stays in the foreground until Ctrl-C.

    make serve                                   # the champion on 127.0.0.1:8000
    python -m flows.serve --port 8001 --version 3
    python -m flows.serve --bundle data/export/bundle   # a local export bundle (its checksums.json)
    python -m flows.serve --verify-only          # download and verify, serve nothing

Not a Prefect flow: it is one long-lived process, with nothing to schedule or retry.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from steps.core import serving


def model_name(args: argparse.Namespace) -> str:
    from steps.core.config import load_config
    from steps.export import ExportConfig

    if args.model_name:
        return args.model_name
    if args.bundle and not Path(args.params).exists():  # a bundle served outside a workspace
        return Path(args.bundle).resolve().name
    return load_config(ExportConfig, "export", args.params).model_name


def prepare(args: argparse.Namespace) -> tuple[str, Path, Path, list[dict[str, str]]]:
    """(what is served, model dir, tokenizer dir, example messages) after verification."""
    if args.bundle:
        bundle = Path(args.bundle).resolve()
        n = serving.verify_bundle(bundle)
        print(f"serve: {bundle}: {n} files match checksums.json", flush=True)
        return str(bundle), bundle, bundle, serving.example_messages()
    from steps.core import tracking
    from steps.core.config import load_config
    from steps.promote import PromoteConfig

    name = model_name(args)
    alias = args.alias or load_config(PromoteConfig, "promote", args.params).alias
    ref = f"models:/{name}/{args.version}" if args.version else f"models:/{name}@{alias}"
    dst = Path(args.dir) / name
    # Always a fresh download: a copy left from an earlier start proves nothing about the store.
    shutil.rmtree(dst, ignore_errors=True)
    got = tracking.download_model(name, alias=None if args.version else alias, version=args.version, dst=dst)
    n = serving.verify_registered(got["path"], got["metadata"], got["tags"], ref)
    print(f"serve: {ref} is version {got['version']}; {n} files match the checksums registered with it "
          f"({got['path']})", flush=True)
    return (f"{name} v{got['version']}", got["path"] / "model", got["path"] / "components" / "tokenizer",
            got["metadata"].get("example_messages") or serving.example_messages())


def serve(args: argparse.Namespace) -> int:
    what, model_dir, tokenizer_dir, messages = prepare(args)
    if args.verify_only:
        return 0
    python = Path(args.vllm_python)
    if not python.exists():
        raise SystemExit(f"serve: {python}: no such interpreter; `make install-vllm` creates .venv-vllm "
                         "(or pass --vllm-python)")
    gpu = {"gpu": True, "cpu": False}.get(args.device, None)
    gpu = serving.has_gpu() if gpu is None else gpu
    name = args.served_model_name or model_name(args)
    cmd = serving.vllm_command(python, model_dir, tokenizer_dir, name, args.host, args.port, gpu,
                               args.max_model_len, args.vllm_arg)
    env = dict(os.environ)
    if not gpu:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", serving.CPU_KVCACHE_GIB)
    print("serve: $ " + " ".join(cmd), flush=True)
    # Its own process group, so that stopping this process stops the engine processes vLLM starts.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        base = f"http://{host}:{args.port}"
        ready_s = serving.wait_ready(proc, base, name, args.ready_timeout_s)
        print(f"\nserve: {what} ready in {ready_s:.1f} s at {base}/v1 (OpenAI-compatible, model {name!r}, "
              f"{'GPU' if gpu else 'CPU'})\n# thinking (the default):\n"
              f"{serving.curl(base, serving.chat_body(name, messages, thinking=True))}\n"
              "# no thinking (the chat template pre-fills an empty think block):\n"
              f"{serving.curl(base, serving.chat_body(name, messages, thinking=False))}\n", flush=True)
        return proc.wait()
    except RuntimeError as e:
        raise SystemExit(f"serve: {e}") from None
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Stop a server started in its own process group (`start_new_session=True`) with every process
    it started (vLLM's engine runs in children): SIGTERM, then SIGKILL after `timeout_s`."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml", help="export.model_name and promote.alias come from here")
    ap.add_argument("--model-name", help="registered model (default: params export.model_name)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--alias", help="registry alias to serve (default: params promote.alias, i.e. champion)")
    which.add_argument("--version", type=int, help="registered version to serve instead of an alias")
    which.add_argument("--bundle", help="serve a local export bundle (verified against its checksums.json)")
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept connections from other machines")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--served-model-name", help="the `model` of requests (default: the registered name)")
    ap.add_argument("--dir", default=".cache/serve", help="where the version is downloaded")
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    ap.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                    help="auto: GPU flags when nvidia-smi lists a GPU, CPU flags otherwise")
    ap.add_argument("--max-model-len", type=int, help="default: the model's max_position_embeddings")
    ap.add_argument("--ready-timeout-s", type=float, default=600.0)
    ap.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                    help="one more argument for vLLM (repeatable), e.g. --vllm-arg=--dtype=float32")
    ap.add_argument("--verify-only", action="store_true", help="download and verify, then exit")
    args = ap.parse_args(argv)
    try:
        return serve(args)
    except (serving.ChecksumError, LookupError) as e:
        print(f"serve: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
