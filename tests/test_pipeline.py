"""The whole DVC pipeline on the micro preset: every output exists and validates, a second
`dvc repro` re-runs nothing, and a grpo parameter re-runs only grpo and what follows it."""
import json
import subprocess
import sys
import time

import pytest
import yaml

from steps.core.io import read_jsonl
from steps.core.schemas import CANDIDATES, validate
from tests.helpers import ROOT, check_pipeline_outputs, dvc, pipeline_workspace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("pipeline")
    return ws, pipeline_workspace(ws)


def test_micro_pipeline_end_to_end(workspace):
    ws, env = workspace
    dvc(ws, env, "repro")
    check_pipeline_outputs(ws)
    registry = json.loads((ws / "data/export/registry.json").read_text())
    assert registry["model_name"] == "livethinking-student" and registry["version"] == 1


def test_second_repro_runs_nothing(workspace):
    ws, env = workspace
    out, seconds = dvc(ws, env, "repro")
    assert "Running stage" not in out, out
    assert seconds < 30


def test_prefect_flow_runs_the_stages_under_one_mlflow_parent_run(workspace):
    """The main job, `python -m flows.pipeline`, in ephemeral Prefect mode: every stage is a task,
    all are up to date (DVC's cache holds), and the summary table is printed."""
    ws, env = workspace
    proc = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=ws, capture_output=True, text=True,
                          env={**env, "PREFECT_HOME": str(ws / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    for stage in yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]:
        assert f"Task run '{stage}'" in log or f"dvc repro --single-item {stage}" in log, stage
    assert "Running stage" not in log
    assert "| rft_grpo |" in proc.stdout


def test_grpo_param_reruns_only_grpo_and_after(workspace):
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["grpo"]["beta"] = 0.01
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, _ = dvc(ws, env, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"grpo", "evaluate", "export", "promote"}, out


def test_sample_stage_killed_half_way_resumes(workspace):
    """SIGKILL the sample stage once its first shards are on disk, start it again: every
    (id, sample_idx) exactly once, and the shards that survived the kill were kept."""
    import signal
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["sample"].update({"shard_size": 2, "max_examples": 24, "backend_options": {"batch_size": 2}})
    (ws / "params_kill.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = ws / "data" / "sample_kill"
    cmd = [sys.executable, "-m", "steps.sample", "--params", "params_kill.yaml", "--out", str(out)]
    kill_env = {**env, "PIPELINE_TRACKING": "off"}
    proc = subprocess.Popen(cmd, cwd=ws, env=kill_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob(".resume/*/part-*.jsonl"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(out.glob(".resume/*/part-*.jsonl"))
    assert 3 <= len(shards) < 12, "the kill should land half-way"
    before = [r for s in shards for r in read_jsonl(s)]
    subprocess.run(cmd, cwd=ws, env=kill_env, check=True, capture_output=True)
    rows = read_jsonl(out / "candidates.jsonl")
    keys = [(r["id"], r["sample_idx"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24 * params["sample"]["k"]
    validate(rows, CANDIDATES, out / "candidates.jsonl")
    assert all(r in rows for r in before)  # work done before the kill was kept, not redone
    assert not (out / ".resume").exists()
