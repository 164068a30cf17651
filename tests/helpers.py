"""Tiny real models and rows for stage-core tests; pipeline workspaces, an S3 server and DVC
remotes for the whole-pipeline tests."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from steps.core import synth
from steps.ingest import parse_ecommerce, parse_musique

ROOT = Path(__file__).resolve().parents[1]

TINY_DENSE = {"type": "qwen3", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64}
TINY_MOE = {"type": "qwen3_moe", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 32,
            "num_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.05}


def examples(n_musique: int = 6, n_ecommerce: int = 4, seed: int = 0) -> list[dict]:
    m, _ = parse_musique(list(enumerate(synth.musique_rows(n_musique, seed), 1)), "synthetic")
    return m + parse_ecommerce(list(enumerate(synth.ecommerce_rows(n_ecommerce, seed), 1)), "synthetic")


def tiny_model(path: Path, arch: dict, rows: list[dict], seed: int = 0) -> Path:
    """Save a freshly initialised tiny model with a tokenizer over `rows` to `path`."""
    from steps.core import modeling
    from steps.pretrain_demo import corpus_texts

    tok = modeling.build_tokenizer(corpus_texts(rows))
    model = modeling.build_model(arch, len(tok), tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def byte_level_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer over `texts`, as real models have (any string is spellable and
    decodes exactly), with the pipeline's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from steps.core.modeling import CHAT_TEMPLATE, SPECIAL

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --- Pipeline workspaces (test_pipeline, test_vllm, test_dvc_remote, test_docker_e2e) -----------

# Commits in test repositories must not depend on the machine's git identity.
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


def overlay(params: dict, preset: dict) -> dict:
    """Each section of `preset` updates the same section of `params` (one level deep)."""
    for section, values in preset.items():
        params.setdefault(section, {}).update(values)
    return params


def pipeline_workspace(ws: Path, *presets: dict, methods: bool = False) -> dict[str, str]:
    """The pipeline's code and dvc.yaml in `ws`, with params.yaml overlaid by tests/micro.yaml
    and then `presets`, as a fresh git + DVC repository. Returns the environment to run it in:
    this venv's tools first, tracking on, to a SQLite store in `ws` (git ignores it).

    Unless `methods`, the workspace is the main job alone (the registry's `main: false` rows and
    the stages only they need are left out): a test of storage, serving or back ends would
    otherwise train every sibling method at each `dvc repro` (tests/test_pipeline.py runs them)."""
    for item in ("steps", "flows", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, ws / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for preset in (yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text()), *presets):
        overlay(params, preset)
    if not methods:
        from steps.core.registry import load_registry, side_stages

        side = side_stages(load_registry(params=params))
        params["models"] = {k: v for k, v in params["models"].items() if v.get("main", True)}
        pipeline = yaml.safe_load((ws / "dvc.yaml").read_text())
        pipeline["stages"] = {k: v for k, v in pipeline["stages"].items() if k not in side}
        (ws / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws / ".gitignore").write_text("mlflow.db\nmlruns/\n.prefect/\n__pycache__/\n.venv-vllm\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PIPELINE_TRACKING": "on",
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "PYTHONPATH": str(ws)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=ws, check=True, env=env)
    return env


def run(cwd: Path, env: dict[str, str], *cmd: str, timeout: float = 600) -> str:
    """Run a command; fail the test with its output's tail when it exits non-zero."""
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} (exit {proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def add_s3_remote(ws: Path, env: dict[str, str], url: str, endpoint: str) -> None:
    run(ws, env, "dvc", "remote", "add", "-d", "s3remote", url)
    run(ws, env, "dvc", "remote", "modify", "s3remote", "endpointurl", endpoint)


def dvc_outputs(ws: Path) -> dict[str, str | None]:
    """sha256 of every file of every output dvc.lock records (None: the file is missing)."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())
    hashes: dict[str, str | None] = {}
    for stage in lock["stages"].values():
        for out in stage.get("outs", []):
            path = ws / out["path"]
            for f in sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]:
                hashes[str(f.relative_to(ws))] = hashlib.sha256(f.read_bytes()).hexdigest() if f.exists() else None
    return hashes


def clone_and_pull(ws: Path, dest: Path, env: dict[str, str]) -> tuple[dict, dict]:
    """Commit `ws`, `git clone` it to `dest` and `dvc pull` there (from the default remote).
    Returns the clone's dvc_outputs before and after the pull. `--allow-missing`: a workspace
    where the flow ran the main job only has sibling-method stages that never ran (no entry in
    dvc.lock), which a plain `dvc pull` reports as an error."""
    run(ws, env, "git", "add", "-A")
    run(ws, env, *GIT, "commit", "-q", "--allow-empty", "-m", "pipeline run")
    run(ws.parent, env, "git", "clone", "-q", str(ws), str(dest))
    before = dvc_outputs(dest)
    run(dest, env, "dvc", "pull", "--allow-missing")
    return before, dvc_outputs(dest)


def when(pred, then, timeout_s: float = 60.0) -> threading.Thread:
    """Run `then()` in a thread as soon as `pred()` holds (polled every 5 ms), or after `timeout_s`
    (a test that needed the event then fails on what it finds, rather than hanging)."""
    def watch() -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and not pred():
            time.sleep(0.005)
        then()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def moto_s3(log_dir: Path) -> Iterator[dict[str, str]]:
    """A moto S3 server on loopback; yields the environment that points boto3 and DVC at it."""
    port = free_port()
    log = (log_dir / "moto.log").open("w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start (exit {proc.poll()}); see {log.name}") from None
                time.sleep(0.2)
        yield {"S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
               "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def dvc(ws: Path, env: dict[str, str], *args: str) -> tuple[str, float]:
    """Run dvc in `ws`; asserts success. Returns (stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.perf_counter() - t0


def stages_run(out: str) -> set[str]:
    """The stages a `dvc repro`'s output says it ran (restored ones are not among them)."""
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}


def check_pipeline_outputs(ws: Path) -> None:
    """Every output of a finished micro pipeline run exists and validates against its schema;
    every row of the workspace's model registry is evaluated and reported, in registry order."""
    from steps.core.io import read_jsonl
    from steps.core.registry import load_registry
    from steps.core.schemas import CANDIDATES, EXAMPLES, JUDGED, PREDICTIONS, validate

    d = ws / "data"
    rows = load_registry(ws / "params.yaml")
    for path, schema in ((d / "ingest/train.jsonl", EXAMPLES), (d / "ingest/dev.jsonl", EXAMPLES),
                         (d / "ingest/eval.jsonl", EXAMPLES), (d / "sample/candidates.jsonl", CANDIDATES),
                         (d / "judge/judged.jsonl", JUDGED),
                         *((d / f"evaluate/{m}/predictions.jsonl", PREDICTIONS) for m in rows)):
        validate(read_jsonl(path), schema, path)
    for row in rows.values():
        assert (ws / row.path / "model.safetensors").exists(), row.path
        if not row.fixed:
            assert (ws / row.path / "meta.json").exists(), row.path
    for f in ("grpo/ref_lengths.jsonl", "grpo/train_log.csv", "export/bundle/checksums.json",
              "export/bundle/README.md", "export/bundle/tokenizer.json"):
        assert (d / f).exists(), f
    summary = json.loads((ws / "reports/summary.json").read_text())
    assert set(summary["datasets"]) == {"musique", "ecommerce"}
    for ds, models in summary["datasets"].items():
        assert list(models) == list(rows)
        for m in models.values():
            for key in ("correctness", "helpfulness", "tokens_per_response", "decode_tflops_per_response"):
                assert 0 <= m[key] <= (1 if key in ("correctness", "helpfulness") else float("inf"))
            assert (m["em"] is None) == (ds == "ecommerce") and m["n"] == 4
    assert (ws / "reports/plots/tokens_vs_correctness.png").stat().st_size > 1000
    for m in rows:
        assert json.loads((d / f"evaluate/{m}/stats.json").read_text())["prompts_over_budget"] == 0
    assert json.loads((d / "sample/stats.json").read_text())["prompts_over_budget"] == 0


def record_loss_gradients(monkeypatch: Any) -> list[dict[str, Any]]:
    """Instrument TRL's GRPOTrainer for one test: each training step appends {logps, grad, mask,
    owner}: the per-token log-probabilities, the loss's gradient with respect to them, the
    completion mask and the rollout's ownership mask (`tool_mask`). A token the policy did not write
    must get a zero gradient whatever the advantage."""
    import torch
    from trl import GRPOTrainer

    seen: list[dict[str, Any]] = []
    logps_of, loss_of = GRPOTrainer._get_per_token_logps_and_entropies, GRPOTrainer._compute_loss

    def recording_logps(self, *a, **k):
        out = logps_of(self, *a, **k)
        if torch.is_grad_enabled():
            seen.append({"logps": out[0]})
        return out

    def recording_loss(self, model, inputs):
        loss = loss_of(self, model, inputs)
        grad, = torch.autograd.grad(loss, seen[-1]["logps"], retain_graph=True)
        seen[-1].update(grad=grad, mask=inputs["completion_mask"], owner=inputs["tool_mask"])
        return loss

    monkeypatch.setattr(GRPOTrainer, "_get_per_token_logps_and_entropies", recording_logps)
    monkeypatch.setattr(GRPOTrainer, "_compute_loss", recording_loss)
    return seen
