"""The whole DVC pipeline on the micro preset: every output exists and validates, a second
`dvc repro` re-runs nothing, and a grpo parameter re-runs only grpo and what follows it."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from steps.core.io import read_jsonl
from steps.core.schemas import CANDIDATES, EXAMPLES, JUDGED, PREDICTIONS, validate

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def overlay(params: dict, preset: dict) -> dict:
    for section, values in preset.items():
        params.setdefault(section, {}).update(values)
    return params


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("pipeline")
    for item in ("steps", "flows", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, ws / item)
    params = overlay(yaml.safe_load((ROOT / "params.yaml").read_text()),
                     yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text()))
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PIPELINE_TRACKING": "on",
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "PYTHONPATH": str(ws)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=ws, check=True, env=env)
    return ws, env


def dvc(ws, env, *args):
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.perf_counter() - t0


def test_micro_pipeline_end_to_end(workspace):
    ws, env = workspace
    dvc(ws, env, "repro")
    d = ws / "data"
    for path, schema in ((d / "ingest/train.jsonl", EXAMPLES), (d / "ingest/eval.jsonl", EXAMPLES),
                         (d / "sample/candidates.jsonl", CANDIDATES), (d / "judge/judged.jsonl", JUDGED),
                         (d / "evaluate/predictions.jsonl", PREDICTIONS)):
        validate(read_jsonl(path), schema, path)
    for model in ("pretrain_demo/teacher", "pretrain_demo/student_base", "rft/model", "grpo/model"):
        assert (d / model / "model.safetensors").exists(), model
    for f in ("rft/model/meta.json", "grpo/model/meta.json", "grpo/ref_lengths.jsonl", "grpo/train_log.csv",
              "export/bundle/checksums.json", "export/bundle/README.md", "export/bundle/tokenizer.json"):
        assert (d / f).exists(), f
    summary = json.loads((ws / "reports/summary.json").read_text())
    assert set(summary["datasets"]) == {"musique", "ecommerce"}
    for ds, models in summary["datasets"].items():
        assert list(models) == ["teacher", "student_base", "rft", "rft_grpo"]
        for m in models.values():
            for key in ("correctness", "helpfulness", "tokens_per_response", "decode_tflops_per_response"):
                assert 0 <= m[key] <= (1 if key in ("correctness", "helpfulness") else float("inf"))
            assert (m["em"] is None) == (ds == "ecommerce") and m["n"] == 4
    assert (ws / "reports/plots/tokens_vs_correctness.png").stat().st_size > 1000
    registry = json.loads((d / "export/registry.json").read_text())
    assert registry["model_name"] == "livethinking-student" and registry["version"] == 1


def test_second_repro_runs_nothing(workspace):
    ws, env = workspace
    out, seconds = dvc(ws, env, "repro")
    assert "Running stage" not in out, out
    assert seconds < 30


def test_grpo_param_reruns_only_grpo_and_after(workspace):
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["grpo"]["beta"] = 0.01
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, _ = dvc(ws, env, "repro")
    ran = {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage")}
    assert ran == {"grpo", "evaluate", "export"}, out
