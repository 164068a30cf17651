"""Tiny real models and rows for stage-core tests; pipeline workspaces, an S3 server and DVC
remotes for the whole-pipeline tests."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from steps.core import synth
from steps.ingest import parse_ecommerce, parse_musique

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


# --- Pipeline workspaces (test_pipeline, test_dvc_remote, test_docker_e2e) -------------------

ROOT = Path(__file__).resolve().parents[1]
# Commits in test repositories must not depend on the machine's git identity.
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]


def overlay(params: dict, preset: dict) -> dict:
    """Each section of `preset` updates the same section of `params` (one level deep)."""
    for section, values in preset.items():
        params.setdefault(section, {}).update(values)
    return params


def pipeline_workspace(ws: Path, *presets: dict) -> dict[str, str]:
    """The pipeline's code and dvc.yaml in `ws`, with params.yaml overlaid by tests/micro.yaml
    and then `presets`, as a fresh git + DVC repository. Returns the environment to run it in:
    this venv's tools first, tracking on, to a SQLite store in `ws` (git ignores it)."""
    for item in ("steps", "flows", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, ws / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for preset in (yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text()), *presets):
        overlay(params, preset)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws / ".gitignore").write_text("mlflow.db\n.prefect/\n__pycache__/\n")
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
    Returns the clone's dvc_outputs before and after the pull."""
    run(ws, env, "git", "add", "-A")
    run(ws, env, *GIT, "commit", "-q", "--allow-empty", "-m", "pipeline run")
    run(ws.parent, env, "git", "clone", "-q", str(ws), str(dest))
    before = dvc_outputs(dest)
    run(dest, env, "dvc", "pull")
    return before, dvc_outputs(dest)


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
        proc.wait(timeout=30)
        log.close()
