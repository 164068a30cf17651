"""Nothing lost, nothing leaked (issue 11): a tracking outage never fails a stage whose outputs are
written, what it could not log is kept and replayed, resume shards outlive everything but
success, and params are redacted before they reach the store."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from steps.core import tracking
from steps.core.io import read_jsonl, write_json, write_jsonl
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-planted0123456789abcdefXYZ"


@pytest.fixture
def outage(tmp_path, monkeypatch):
    """Tracking on, pointed at a closed port; MLflow's HTTP retries off so the test is quick."""
    uri = f"http://127.0.0.1:{free_port()}"
    env = {"PIPELINE_TRACKING": "on", "MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "PIPELINE_TRACKING_PENDING": str(tmp_path / "pending.jsonl")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def _runs(uri: str, name: str):
    import mlflow
    client = mlflow.MlflowClient(uri)
    exps = client.search_experiments()
    return [r for r in client.search_runs([e.experiment_id for e in exps]) if r.info.run_name == name]


def test_log_stage_survives_an_outage_and_replay_sends_it(tmp_path, outage, caplog):
    cfg = {"k": 4, "backend_options": {"api_key": SECRET, "base_url": "http://server:8000/v1"}}
    with caplog.at_level("WARNING"):
        assert tracking.log_stage("sample", cfg, metrics={"m": 1.5}, history=[{"step": 3, "loss": 2.0}]) is False
    line = [r.getMessage() for r in caplog.records if "tracking unavailable" in r.getMessage()]
    assert len(line) == 1 and line[0].startswith(f"tracking unavailable ({outage['MLFLOW_TRACKING_URI']}): stage "
                                                 "sample was not logged") and "replay" in line[0]
    pending = tmp_path / "pending.jsonl"
    assert SECRET not in pending.read_text() and len(read_jsonl(pending)) == 1
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, "-m", "steps.core.tracking", "replay", "--uri", store], cwd=tmp_path,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and "1 record(s) sent, 0 left" in proc.stdout, proc.stderr[-2000:]
    (run,) = _runs(store, "sample")
    assert run.data.params == {"k": "4", "backend_options.api_key": "***redacted***",
                               "backend_options.base_url": "http://server:8000/v1"}
    assert run.data.metrics == {"m": 1.5, "loss": 2.0} and run.data.tags["replayed"] == "true"
    assert pending.read_text() == ""


def test_pipeline_run_survives_an_outage_and_stage_errors_still_propagate(tmp_path, outage):
    with tracking.pipeline_run("pipeline", {"base": {"seed": 0}}) as parent:
        assert parent is None
    with pytest.raises(RuntimeError, match="stage failed"), tracking.pipeline_run("pipeline", {}):
        raise RuntimeError("stage failed")
    assert [r["kind"] for r in read_jsonl(tmp_path / "pending.jsonl")] == ["pipeline", "pipeline"]


def test_secrets_are_redacted_in_stage_and_pipeline_runs(tmp_path, monkeypatch):
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("PIPELINE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    params = {"sample": {"backend_options": {"api_key": SECRET, "extra_body": {"h": f"Bearer {SECRET}"}}},
              "judge": {"options": {"base_url": "http://user:hunter2pass@judge:8000/v1", "token": "tok-123456"}},
              "rft": {"max_steps": 3}}
    monkeypatch.setenv("PIPELINE_TRACKING_PENDING", str(tmp_path / "pending.jsonl"))
    with tracking.pipeline_run("pipeline", params) as parent:  # (stages log from their own processes)
        assert parent
    assert tracking.log_stage("judge", params["judge"], metrics={"x": 1.0})
    blob = db.read_bytes()
    for leaked in (SECRET.encode(), b"hunter2pass", b"tok-123456"):
        assert leaked not in blob
    (run,) = _runs(f"sqlite:///{db}", "pipeline")
    assert run.data.params["sample.backend_options.api_key"] == "***redacted***"
    assert run.data.params["judge.options.base_url"] == "http://***redacted***@judge:8000/v1"
    assert run.data.params["rft.max_steps"] == "3"


def test_sample_killed_while_tracking_hangs_keeps_its_shards_and_the_rerun_sends_nothing(serve, tmp_path):
    """The issue's reproduction: the tracking server does not answer. A kill while the stage
    waits on it must not lose the finished samples (the shards go only after success); the run
    after it, with the server down, re-uses them all, exits 0 and keeps the record to replay."""
    from tests.test_backend_openai import examples

    server = serve()
    rows = examples(4, 4)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_json(tmp_path / "models.json", {"teacher": "fake", "student_base": "fake"})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 0}, "sample": {
        "backend": "openai", "model": "fake", "k": 2, "shard_size": 2,
        "backend_options": {"base_url": server.base_url, "progress": False, "backoff_initial_s": 0.01}}}))
    cmd = [sys.executable, "-m", "steps.sample", "--params", "params.yaml", "--data", "train.jsonl",
           "--models", "models.json", "--out", "out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_TRACKING": "on", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
           "PIPELINE_TRACKING_PENDING": str(tmp_path / "pending.jsonl")}
    with socket.socket() as black_hole:  # accepts connections, never answers
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(64)
        hang = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{black_hole.getsockname()[1]}",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "300"}
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=hang, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not (tmp_path / "out/candidates.jsonl").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        time.sleep(1.0)  # now in tracking, waiting on the server that never answers
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert list((tmp_path / "out/.resume").rglob("part-*.jsonl")), "the kill lost the finished samples"
    sent = server.posts
    assert sent == 16
    down = {**env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    done = subprocess.run(cmd, cwd=tmp_path, env=down, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert server.posts == sent  # no request sent twice
    assert len(read_jsonl(tmp_path / "out/candidates.jsonl")) == 16 and (tmp_path / "out/stats.json").exists()
    assert not (tmp_path / "out/.resume").exists()
    warnings = [line for line in done.stderr.splitlines() if "tracking unavailable" in line]
    assert len(warnings) == 1 and down["MLFLOW_TRACKING_URI"] in warnings[0], done.stderr[-2000:]
    assert [r["stage"] for r in read_jsonl(tmp_path / "pending.jsonl")] == ["sample"]
    assert json.loads((tmp_path / "out/stats.json").read_text())["candidates"] == 16
