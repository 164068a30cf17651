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
from tests.helpers import ROOT, check_pipeline_outputs, dvc, pipeline_workspace, stages_run

pytestmark = pytest.mark.slow


# Output of the first `dvc repro` of the module's workspace, for the tests that read what ran.
FIRST_RUN: dict[str, str] = {}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """This repository on the micro preset, every method included, plus a throwaway method added
    by files and params alone (add_toy_method): one `dvc repro` builds them all, which costs a
    third of a run again less than adding it afterwards (its reward module is a new file in
    steps/core/rewards, which every RL stage imports, so every RL method would retrain)."""
    ws = tmp_path_factory.mktemp("pipeline")
    env = pipeline_workspace(ws, methods=True)
    # Rows that repeat another row's stage and protocol add no code path, only an evaluation each
    # (about 15 s): the two further Router-R1 alphas (router_r1 is evaluated; the stage still trains
    # all three) and the second single-member route (route_teacher is evaluated).
    params = yaml.safe_load((ws / "params.yaml").read_text())
    for name in REPEATED_ROWS:
        del params["models"][name]
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    add_toy_method(ws)
    return ws, env


REPEATED_ROWS = ("router_r1_a05", "router_r1_a09", "route_student_base")


def test_the_rows_left_out_repeat_a_kept_rows_stage_and_protocol():
    from steps.core.registry import load_registry
    rows = load_registry(ROOT / "params.yaml")
    kept = {(r.stage, r.protocol) for n, r in rows.items() if n not in REPEATED_ROWS}
    assert all((rows[n].stage, rows[n].protocol) in kept for n in REPEATED_ROWS)


def test_micro_pipeline_end_to_end(workspace):
    ws, env = workspace
    FIRST_RUN["out"], _ = dvc(ws, env, "repro")
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
    from flows.pipeline import stage_names
    from steps.core.registry import load_registry, side_stages
    rows = load_registry(ws / "params.yaml")
    side = side_stages(rows)
    # the sibling methods are `dvc repro`'s and `make compare`'s; the main job's stages are not
    main_stages = {r.stage for r in rows.values() if r.main} | {f"evaluate@{n}" for n, r in rows.items() if r.main}
    assert {f"evaluate@{n}" for n, r in rows.items() if not r.main} <= side
    assert {r.stage for r in rows.values() if not r.main} - main_stages <= side and not main_stages & side
    assert {"dler", "adaptthink", "relay", "router", "evaluate@rft_no_think"} <= side  # the methods are there
    for stage in stage_names(ws / "dvc.yaml"):
        ran = f"dvc repro --single-item {stage}" in log
        assert ran == (stage not in side), stage
    assert "Running stage" not in log
    assert "| rft_grpo |" in proc.stdout


def test_editing_any_module_a_stage_runs_makes_dvc_report_it(workspace):
    """After a full run, append a comment to every module grpo runs (its transitive steps.*
    imports): `dvc status grpo` names each file, or the directory dep that holds it, as a changed
    dependency. (One status for all the edits: each line names one dep exactly, so a file no dep
    covers has no line of its own to hide behind.)"""
    from steps.core.deps import closure
    ws, env = workspace
    files = sorted(f.relative_to(ROOT) for f in closure("steps.grpo"))
    originals = {rel: (ws / rel).read_bytes() for rel in files}
    try:
        for rel, original in originals.items():
            (ws / rel).write_bytes(original + b"\n# edited\n")
        out = subprocess.run(["dvc", "status", "grpo"], cwd=ws, env=env, capture_output=True, text=True).stdout
    finally:
        for rel, original in originals.items():
            (ws / rel).write_bytes(original)
    modified = {line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("modified:")}
    for rel in files:
        assert any(str(p) in modified for p in [rel, *rel.parents]), (str(rel), out)
    out, _ = dvc(ws, env, "status")
    assert "up to date" in out, out


def test_export_source_exports_exactly_that_models_weights(workspace):
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["export"]["source"] = "rft"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, _ = dvc(ws, env, "repro", "export")
    assert (ws / "data/export/bundle/model.safetensors").read_bytes() == (ws / "data/rft/model/model.safetensors").read_bytes()
    params["export"]["source"] = "rft_grpo"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(ws, env, "repro", "export")
    assert (ws / "data/export/bundle/model.safetensors").read_bytes() == (ws / "data/grpo/model/model.safetensors").read_bytes()


def test_grpo_param_reruns_only_grpo_and_after(workspace):
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["grpo"]["beta"] = 0.01
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, _ = dvc(ws, env, "repro")
    assert stages_run(out) == {"grpo", "evaluate@rft_grpo", "report", "export", "promote"}, out


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


TOY_STAGE = '''"""toy: a throwaway RL method, added by files and params alone."""
import argparse
from dataclasses import dataclass, field
from pathlib import Path

from steps.core.config import load_config
from steps.core.rl import RLConfig, finish_stage, prompt_rows, train_rl
from steps.core.schemas import EXAMPLES, read_validated


@dataclass(frozen=True)
class ToyConfig(RLConfig):
    rewards: dict = field(default_factory=lambda: {"brevity": {"weight": 1.0}})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="data/toy")
    args = ap.parse_args()
    cfg = load_config(ToyConfig, "toy")
    rows = prompt_rows(cfg, read_validated("data/ingest/train.jsonl", EXAMPLES), "data/rft/model")
    out = Path(args.out)
    finish_stage("toy", cfg, "data/rft/model", out, train_rl(cfg, rows, "data/rft/model", out))


if __name__ == "__main__":
    main()
'''
TOY_REWARD = '''def make_brevity(max_words: int = 5):
    def brevity(completions, **_):
        return [float(len(c.split()) <= max_words) for c in completions]
    return brevity


REWARDS = {"brevity": make_brevity}
'''


def add_toy_method(ws):
    """A throwaway method, as a user adds one: its stage module, its reward module, its params
    section and registry row, its dvc.yaml stage. Nothing shared is edited."""
    (ws / "steps/toy.py").write_text(TOY_STAGE)
    (ws / "steps/core/rewards/toy.py").write_text(TOY_REWARD)
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["toy"] = {"max_steps": 2, "num_generations": 2, "prompts_per_step": 2, "max_prompts": 8,
                     "max_completion_length": 16, "rewards": {"brevity": {"weight": 1.0, "max_words": 4}}}
    params["models"]["toy"] = {"stage": "toy", "path": "data/toy/model", "compare_to": "rft", "seeds": [0, 1]}
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = {"cmd": "python -m steps.toy --out data/toy", "params": ["base.seed", "toy"],
             "deps": ["steps/toy.py", "steps/core", "data/ingest/train.jsonl", "data/rft/model"],
             "outs": ["data/toy/model"]}
    dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
    dvc_yaml["stages"]["toy"] = stage
    (ws / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


def test_a_new_method_is_files_and_params_only(workspace):
    """The throwaway method of add_toy_method is trained, evaluated and reported by the pipeline's
    `dvc repro` and exported when `export.source` names it, with no edit to evaluate, the report,
    export or the test helpers (tests/helpers.py, which checked the outputs, is this repository's)."""
    ws, env = workspace
    out = FIRST_RUN["out"]
    assert "Running stage 'toy'" in out and "Running stage 'evaluate@toy'" in out
    shared = ["steps/evaluate.py", "steps/report.py", "steps/export.py", "steps/core/rewards/__init__.py"]
    assert all((ws / f).read_bytes() == (ROOT / f).read_bytes() for f in shared)
    summary = json.loads((ws / "reports/summary.json").read_text())
    assert all(list(models)[-1] == "toy" for models in summary["datasets"].values())
    params = yaml.safe_load((ws / "params.yaml").read_text())
    source = params["export"]["source"]
    params["export"]["source"] = "toy"
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out, _ = dvc(ws, env, "repro", "export")
    assert "Running stage 'toy'" not in out  # nothing upstream of export is re-made
    bundle = (ws / "data/export/bundle/model.safetensors").read_bytes()
    assert bundle == (ws / "data/toy/model/model.safetensors").read_bytes()
    assert json.loads((ws / "data/export/bundle/meta.json").read_text())["source"] == "toy"
    params["export"]["source"] = source
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_a_killed_flow_leaves_no_server_and_no_stage_running(workspace):
    """SIGTERM to `python -m flows.pipeline` mid-stage (a scheduler's stop, `kill`, `timeout`):
    the flow exits, and with it Prefect's ephemeral API server (a uvicorn child, stopped by an
    atexit hook that the default SIGTERM action skips) and the stage's `dvc repro`; the stage
    then re-runs cleanly."""
    import signal

    import psutil

    ws, env = workspace
    proc = subprocess.Popen([sys.executable, "-m", "flows.pipeline", "--stages", "rft", "--force"], cwd=ws,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**env, "PREFECT_HOME": str(ws / ".prefect-kill"),
                                 "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "dvc repro --single-item rft" in line:
            break
    time.sleep(3)  # the stage is training now
    children = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(c.cmdline()) for c in children), "no ephemeral server?\n" + "".join(seen)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    gone, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [" ".join(p.cmdline()) for p in alive]
    dvc(ws, env, "repro", "rft")
    out, _ = dvc(ws, env, "status", "rft")
    assert "changed" not in out, out
