"""Secrets never stored (issue 11): a literal secret in params is refused (test_config), the
back ends read keys from the environment, and after a whole pipeline run with a key in the
environment no file the run wrote holds it: not the MLflow store, dvc.lock, the logs, meta.json,
the model card or any stats."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from steps.core.secrets import REDACTED, find_secrets, redact, secret_key

SECRET = "sk-planted-7Hq2ZfX9LmN4pR8sT1vW3yB6"


@pytest.mark.parametrize("key,is_secret", [
    ("api_key", True), ("OPENAI_API_KEY", True), ("hf_token", True), ("password", True), ("client-secret", True),
    ("aws_secret_access_key", True), ("Authorization", True), ("api_key_env", False), ("max_new_tokens", False),
    ("tokens_per_response", False), ("tokenizer", False), ("max_prompt_tokens", False), ("key_fields", False),
])
def test_secret_key_names(key, is_secret):
    assert secret_key(key) is is_secret


def test_find_and_redact():
    params = {"sample": {"backend_options": {"api_key": "abc", "api_key_env": "OPENAI_API_KEY", "token": None}},
              "x": [{"note": f"use {SECRET} here"}, "plain"], "y": {"url": "https://u:pw@h/v1", "n": 3}}
    assert find_secrets(params) == ["sample.backend_options.api_key", "x[0].note", "y.url"]
    assert redact(params) == {"sample": {"backend_options": {"api_key": REDACTED, "api_key_env": "OPENAI_API_KEY",
                                                             "token": None}},
                              "x": [{"note": f"use {REDACTED} here"}, "plain"],
                              "y": {"url": f"https://{REDACTED}@h/v1", "n": 3}}


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(str(p.relative_to(root)))
            except OSError:
                pass
    return hits


@pytest.mark.slow
def test_a_key_in_the_environment_reaches_the_server_and_no_file_of_the_run(serve, tmp_path, micro_run):
    """The micro pipeline through the Prefect flow (so the MLflow parent run logs all params),
    sampling and judging through an OpenAI-protocol server that needs the key. The key is used
    (the server saw it), and then searched for in every file of the workspace and the logs.
    The DVC cache is the session's finished micro run's (tests/conftest.py): the stages that never
    see the key (ingest, pretrain_demo and the teacher's and student base's evaluations) come from
    its run cache; sample, the judge and every stage that reads them run here."""
    from tests.helpers import pipeline_workspace

    server = serve()
    via_env = {"base_url": server.base_url, "api_key_env": "PLANTED_API_KEY", "progress": False}
    ws = tmp_path / "ws"
    ws.mkdir()
    env = pipeline_workspace(ws, {"sample": {"backend": "openai", "model": "fake", "backend_options": via_env},
                                  "judge": {"kind": "llm", "options": {"model": "fake", **via_env}}})
    env = {**env, "PLANTED_API_KEY": SECRET, "PREFECT_HOME": str(ws / ".prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run(["dvc", "cache", "dir", "--local", str(micro_run[0] / ".dvc" / "cache")], cwd=ws, env=env,
                   check=True)
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # (the flow runs the main job; the sibling methods' rows are `dvc repro`'s: test_pipeline checks those)
    assert server.authorizations == {f"Bearer {SECRET}"}  # sample's and the judge's requests carried it
    # The search works: it finds the key where it is, and the files named in the issue exist.
    (tmp_path / "control.txt").write_text(f"x {SECRET} y")
    assert _files_holding(tmp_path, SECRET.encode()) == ["control.txt"]
    for f in ("mlflow.db", "dvc.lock", "data/rft/model/meta.json", "data/export/bundle/README.md",
              "data/export/bundle/meta.json", "data/sample/stats.json", "data/judge/stats.json",
              "reports/summary.json"):
        assert (ws / f).exists(), f
    assert "PLANTED_API_KEY" in (ws / "dvc.lock").read_text()  # the variable's name is what params hold
    assert SECRET not in proc.stdout + proc.stderr
    assert os.environ.get("PLANTED_API_KEY") is None
