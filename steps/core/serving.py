"""Serving a registered model: checksum verification, vLLM's OpenAI-compatible server, and the
request a person pastes to try it. flows/serve.py puts these together (`make serve`).

A registered version (steps.core.tracking.register_bundle) is an MLflow transformers model:
`model/` holds the weights, config and generation config, `components/tokenizer/` the tokenizer
with its chat template, and MLmodel's metadata the sha256 of every other file (`checksums`).
vLLM serves `model/` with `--tokenizer components/tokenizer`; an export bundle
(data/export/bundle, with its checksums.json) is one folder holding both.

On CPU, vLLM 0.32 needs `--enforce-eager` (no CUDA graphs), `--no-enable-chunked-prefill` (its
engine fails when a seeded request's prefill is split across steps: "CPU Generator does not use
offset") and a KV cache size (VLLM_CPU_KVCACHE_SPACE, GiB); its attention takes head sizes 32,
64, 80, 96, ... only.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from steps.core.storage import sha256_file

CPU_FLAGS = ("--enforce-eager", "--no-enable-chunked-prefill")
CPU_KVCACHE_GIB = "1"


class ChecksumError(RuntimeError):
    """A file to be served is missing or differs from the checksums recorded at registration."""


def verify_files(root: Path, checksums: dict[str, str], what: str, fix: str) -> int:
    """Check every file of `checksums` ({relative path: sha256}) under `root`. Raises
    ChecksumError naming the first file that is missing or differs, and `fix` (what to do).
    Returns the number of files checked."""
    if not checksums:
        raise ChecksumError(f"{root}: {what} lists no checksums, so nothing can be verified; {fix}")
    for rel, expected in sorted(checksums.items()):
        path = root / rel
        if not path.is_file():
            raise ChecksumError(f"{path}: missing, but {what} lists it; {fix}")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumError(f"{path}: sha256 {actual} differs from {expected} recorded in {what}; "
                                f"refusing to serve it. {fix}")
    return len(checksums)


def verify_registered(path: Path, metadata: dict[str, Any], tags: dict[str, str], ref: str) -> int:
    """A downloaded registered version: its checksum table must be the one the registry pinned
    (tag checksums_sha256), and every file must match it."""
    from steps.core.tracking import CHECKSUMS_TAG, MLMODEL, checksum_table_digest

    fix = (f"the artefact store's copy of {ref} is not what was registered: re-export and register "
           "it again, or serve another version (--version / --alias)")
    checksums = metadata.get("checksums") or {}
    pinned = tags.get(CHECKSUMS_TAG)
    if pinned is None:
        raise ChecksumError(f"{ref}: the version has no {CHECKSUMS_TAG} tag (registered before checksums "
                            "were recorded?); re-export it")
    if checksum_table_digest(checksums) != pinned:
        raise ChecksumError(f"{path / MLMODEL}: its checksum table differs from the one the registry "
                            f"pinned ({CHECKSUMS_TAG}={pinned}); {fix}")
    return verify_files(path, checksums, f"{ref}'s MLmodel", fix)


def verify_bundle(bundle: Path) -> int:
    """An export bundle: every file its checksums.json names."""
    manifest = bundle / "checksums.json"
    if not manifest.is_file():
        raise ChecksumError(f"{manifest}: not found; a bundle is served only with its checksums "
                            "(run the export stage: dvc repro export)")
    return verify_files(bundle, json.loads(manifest.read_text()), str(manifest),
                        "run the export stage again (dvc repro -f export)")


def has_gpu() -> bool:
    """An NVIDIA GPU is visible (nvidia-smi lists one). The pipeline's own torch may be a CPU
    build even on a GPU machine, so it is not asked."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    out = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    return out.returncode == 0 and "GPU" in out.stdout


def vllm_command(python: Path | str, model_dir: Path, tokenizer_dir: Path, served_name: str, host: str,
                 port: int, gpu: bool, max_model_len: int | None = None, extra: list[str] = ()) -> list[str]:
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--tokenizer", str(tokenizer_dir), "--served-model-name", served_name, "--host", host,
           "--port", str(port)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    return cmd + ([] if gpu else list(CPU_FLAGS)) + list(extra)


def wait_ready(proc: subprocess.Popen, base_url: str, served_name: str, timeout_s: float) -> float:
    """Seconds until GET /v1/models lists `served_name`. Raises RuntimeError when the server
    exits first or the time runs out."""
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the vLLM server exited with code {proc.returncode} before it was ready "
                               "(its log is above)")
        if time.perf_counter() - t0 > timeout_s:
            raise RuntimeError(f"the vLLM server was not ready in {timeout_s:.0f} s (--ready-timeout-s)")
        try:
            with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as r:
                if served_name in r.read().decode():
                    return time.perf_counter() - t0
        except OSError:
            pass
        time.sleep(0.5)


def chat_body(served_name: str, messages: list[dict[str, str]], thinking: bool,
              max_tokens: int = 128) -> dict[str, Any]:
    body: dict[str, Any] = {"model": served_name, "messages": messages, "max_tokens": max_tokens}
    if not thinking:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return body


def curl(base_url: str, body: dict[str, Any]) -> str:
    """A ready-to-paste curl for a chat completion (the body shell-quoted)."""
    return (f"curl -s {base_url}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")


def example_messages(seed: int = 0) -> list[dict[str, str]]:
    """The chat turns of one synthetic MuSiQue-style example, as the pipeline prompts it: the
    input example of a registered model, and the body of the printed curl."""
    from steps.core import prompts, synth
    from steps.ingest import parse_musique

    rows, _ = parse_musique([(1, synth.musique_rows(1, seed)[0])], "synthetic")
    return prompts.messages(rows[0])

