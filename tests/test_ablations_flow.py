"""`python -m flows.ablations` on the micro preset: real `dvc exp run`s for a two-seed variant pair,
GRPO from the student base with β > 0; the report, the plots, MLflow's GRPO curves, models
evaluated once, a resumed second call that runs nothing, and the workspace put back. Then
`python -m flows.compare` (make compare) in the same workspace: every method of the registry at
its seeds, the methods report and its Pareto plot."""
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import overlay, stages_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

VARIANTS = {"variants": {
    "rft_only": {"model": "rft", "seeds": [0, 1]},
    "rft_grpo": {"model": "rft_grpo", "seeds": [0, 1]},
    # two overrides in one variant: one run fewer than a variant each
    "grpo_only_beta": {"model": "rft_grpo", "overrides": {"grpo.init": "student_base", "grpo.beta": 0.04}},
}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, micro_run):
    """A committed micro workspace whose default pipeline has run (so it has a dvc.lock to restore).
    Its DVC cache is the session's finished micro run's (tests/conftest.py), as a team shares one:
    `dvc repro` takes every stage that run made from DVC's run cache and runs only dler, its
    evaluation and the report."""
    ws = tmp_path_factory.mktemp("ablations")
    for item in ("steps", "flows", "dvc.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, ws / item)
    params = overlay(yaml.safe_load((ROOT / "params.yaml").read_text()),
                     yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text()))
    # The flows' mechanics need the main job and one sibling method (dler); every further method
    # would be retrained in each seed run (the micro pipeline test runs them all once).
    params["models"] = {k: v for k, v in params["models"].items()
                        if k in ("teacher", "student_base", "rft", "rft_grpo", "dler")}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (ws / "ablations.yaml").write_text(yaml.safe_dump(VARIANTS, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PIPELINE_TRACKING": "on",
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "PYTHONPATH": str(ws),
           "PREFECT_HOME": str(ws / ".prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@localhost",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@localhost"}
    shared_cache = str(micro_run[0] / ".dvc" / "cache")
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
                ["dvc", "cache", "dir", "--local", shared_cache],
                ["dvc", "repro", "report"], ["git", "add", "-A"], ["git", "commit", "-qm", "micro"]):
        proc = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        if cmd[:2] == ["dvc", "repro"]:
            assert stages_run(proc.stdout) == {"dler", "evaluate@dler", "report"}, proc.stdout[-3000:]
    return ws, env


def flow(ws, env):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.ablations"], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.perf_counter() - t0


def mlflow_query(ws, select, join, stage, experiment):
    """Rows about the MLflow run of one stage in one experiment (read from the SQLite store)."""
    sql = (f"SELECT {select} FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'experiment' {join} "
           "WHERE r.name = ? AND t.value = ?")
    with sqlite3.connect(ws / "mlflow.db") as db:
        return db.execute(sql, (stage, experiment)).fetchall()


def stage_params(ws, stage, experiment):
    return dict(mlflow_query(ws, "p.key, p.value", "JOIN params p ON p.run_uuid = r.run_uuid", stage, experiment))


def metric_steps(ws, stage, experiment, key):
    return [s for (s,) in mlflow_query(ws, "m.step", f"JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = '{key}'",
                                       stage, experiment)]


def test_ablations_flow_runs_reports_and_restores(workspace):
    ws, env = workspace
    before = {f: (ws / f).read_bytes() for f in ("params.yaml", "dvc.lock", "reports/summary.json")}
    log, seconds = flow(ws, env)
    print(f"ablations flow on the micro preset: {seconds:.0f} s")

    report = json.loads((ws / "reports/ablations.json").read_text())
    assert set(report["variants"]) == set(VARIANTS["variants"]) and not report["missing"]
    assert set(report["references"]) == {"teacher", "student_base"}
    for name, v in {**report["variants"], **report["references"]}.items():
        assert v["n_seeds"] == (2 if name in ("rft_only", "rft_grpo") else 1), name
        assert list(v["datasets"]) == ["musique", "ecommerce"]
        for ds, metrics in v["datasets"].items():
            for field in ("correctness", "helpfulness", "em", "f1", "tokens_per_response",
                          "decode_tflops_per_response"):
                s = metrics[field]
                assert set(s) == {"mean", "std", "min", "max"}
                assert (s["mean"] is None) == (ds == "ecommerce" and field in ("em", "f1")), (name, ds, field)
                assert (s["std"] is None) == (s["mean"] is None or v["n_seeds"] == 1), (name, ds, field)
    assert report["variants"]["rft_only"]["runs"] == report["variants"]["rft_grpo"]["runs"] == ["default-s0", "default-s1"]

    from matplotlib.image import imread
    for png in ("ablations_pareto.png", "grpo_curves.png"):
        img = imread(ws / "reports/plots" / png)
        assert img.shape[0] > 300 and img.shape[1] > 600 and img.std() > 0.01, png
    assert "## musique" in (ws / "reports/ablations.md").read_text()

    # Every run is a real one: its own seed, starting policy and β reached the stages.
    assert stage_params(ws, "rft", "default-s1")["seed"] == "1"
    assert stage_params(ws, "grpo", "default-s1")["seed"] == "1"
    assert stage_params(ws, "grpo", "grpo_only_beta-s0")["init"] == "student_base"
    assert stage_params(ws, "grpo", "grpo_only_beta-s0")["beta"] == "0.04"
    # β > 0: TRL built the reference model (MoE student) and logged the KL, in the copy and per step in MLflow.
    beta_log = (ws / "reports/ablations/runs/grpo_only_beta-s0/train_log.csv").read_text().splitlines()
    assert "kl" in beta_log[0].split(",")
    assert len(metric_steps(ws, "grpo", "grpo_only_beta-s0", "kl")) >= 2
    for curve in ("reward", "rewards/length/mean", "completions/mean_length"):
        assert len(metric_steps(ws, "grpo", "grpo_only_beta-s0", curve)) >= 2, curve
    # The teacher and the student base were evaluated once (their own DVC stages): no run re-ran them.
    assert "Running stage 'evaluate@teacher'" not in log and "Running stage 'evaluate@student_base'" not in log
    assert "Running stage 'evaluate@rft_grpo'" in log

    # The workspace is back: params, lock and uncached outputs as committed, the data matching them.
    for f, content in before.items():
        assert (ws / f).read_bytes() == content, f
    status = subprocess.run(["dvc", "status", "report"], cwd=ws, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout
    assert not (ws / ".cache/ablations/workspace").exists()

    # A second call finds every copy and runs nothing.
    log, seconds = flow(ws, env)
    assert "to run" not in log and "Running stage" not in log and "Task run" not in log
    assert (ws / "params.yaml").read_bytes() == before["params.yaml"]


def test_compare_flow_reports_every_method_over_its_seeds(workspace):
    """Runs after the ablations: DVC's run cache gives back what their seed runs trained."""
    from steps.core.registry import load_registry
    ws, env = workspace
    before = {f: (ws / f).read_bytes() for f in ("params.yaml", "dvc.lock", "reports/summary.json")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "flows.compare"], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"compare flow on the micro preset: {time.perf_counter() - t0:.0f} s")
    rows = load_registry(ws / "params.yaml")
    report = json.loads((ws / "reports/methods.json").read_text())
    methods = [n for n, r in rows.items() if not r.fixed]
    assert list(report["variants"]) == methods and "dler" in methods and not report["missing"]
    assert set(report["references"]) == {n for n, r in rows.items() if r.fixed}
    for name in methods:
        v = report["variants"][name]
        assert v["n_seeds"] == len(rows[name].seeds) == 2 and v["runs"] == ["default-s0", "default-s1"]
        assert v["datasets"]["musique"]["correctness"]["std"] is not None
    assert set(report["pareto_front"]) == {"musique", "ecommerce"}
    assert "| dler | dler | 2 |" in (ws / "reports/methods.md").read_text()
    from matplotlib.image import imread
    img = imread(ws / "reports/plots/methods_pareto.png")
    assert img.shape[1] > 600 and img.std() > 0.01
    for f, content in before.items():
        assert (ws / f).read_bytes() == content, f
    # Both seeds' dler logs were kept with the run copies.
    assert all((ws / f"reports/compare/runs/default-s{s}/dler_train_log.csv").exists() for s in (0, 1))
