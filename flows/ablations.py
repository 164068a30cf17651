"""Ablations as DVC experiments, then their report.

Every distinct (overrides, seed) of ablations.yaml is one `dvc exp run -n <run> -S key=value ...
evaluate@<row> ...` in this workspace, one after the other: the rows are the main job's, the
variant's and those it is compared to, never a sibling method the variant does not need. All runs
share the workspace's DVC cache and run cache: a stage whose inputs a previous run already saw is
restored, not re-run (the teacher's and the student base's evaluations are made once). The
experiments stop at the evaluations: export and promote would register every variant in the
model registry. Right after a run, `steps.report --rows` writes its summary into
reports/ablations/runs/<run>/ and the RL stages' data/<stage>/train_log.csv are copied there with
a run.json; a run whose copy exists with the same settings and rows, made from the same baseline
(baseline_digest: params.yaml, dvc.yaml, dvc.lock and the stages' code), is skipped, so an
interrupted flow resumes and a changed workspace runs again. At the end the workspace is put back
as it was, also when a run fails or the flow is killed (the next start restores first): params.yaml, dvc.lock and the outputs DVC does not
cache from a snapshot, the rest by `dvc checkout`.
Then steps/ablations.py writes the report.

    python -m flows.ablations                            # every variant
    python -m flows.ablations --only rft_grpo grpo_only  # some of them
    python -m flows.ablations --dry-run                  # the plan and its commands
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

from flows.pipeline import StageFailed, _stream, exit_on_sigterm
from steps import ablations as report_step
from steps.core.io import read_json, write_json

RUNS = Path("reports/ablations/runs")
# What the experiments change that `dvc checkout` cannot bring back, saved while the flow runs.
SNAPSHOT = Path(".cache/ablations/workspace")


def dvc_command(run: report_step.Run) -> list[str]:
    cmd = ["dvc", "exp", "run", "-n", run.name]
    for key, value in run.settings.items():
        cmd += ["-S", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    # Only what the run reports: `report` would pull in every sibling method's training through
    # its dependency on data/evaluate; the run's summary is written from its rows after it.
    return cmd + ([f"evaluate@{r}" for r in run.rows] if run.rows else ["report"])


def report_command(run: report_step.Run, dest: Path) -> list[str]:
    """The run's own summary (summary.json, .md, plots) into its copy, from the rows it evaluated."""
    return [sys.executable, "-m", "steps.report", "--out", str(dest)] + (["--rows", *run.rows] if run.rows else [])


def baseline_digest(root: Path = Path(".")) -> str:
    """What a run is made from besides its own settings: the workspace's params.yaml, dvc.yaml and
    dvc.lock and every module under steps/. A copy made from another baseline (new defaults, new
    code, another `make run`) is stale and is run again; DVC's run cache gives back every stage
    whose inputs did not change, so the re-run costs only what did. While a killed flow's snapshot
    waits to be restored, the workspace files are read from it (the live params.yaml may hold a
    run's overrides)."""
    snapshot = root / SNAPSHOT
    complete = (snapshot / "manifest.json").exists()
    h = hashlib.sha256()
    for rel in [Path("params.yaml"), Path("dvc.yaml"), Path("dvc.lock"),
                *sorted(p.relative_to(root) for p in (root / "steps").rglob("*.py"))]:
        f = snapshot / rel if complete and (snapshot / rel).exists() else root / rel
        h.update(str(rel).encode() + b"\0" + (f.read_bytes() if f.exists() else b"") + b"\0")
    return h.hexdigest()[:16]


def is_copied(run: report_step.Run, runs_dir: Path, baseline: str | None) -> bool:
    meta = runs_dir / run.name / "run.json"
    if not meta.exists():
        return False
    done = read_json(meta)
    return ((done.get("overrides"), done.get("seed"), done.get("settings"), tuple(done.get("rows") or ()),
             done.get("baseline")) == (run.overrides, run.seed, run.settings, run.rows, baseline))


def workspace_files(dvc_yaml: Path = Path("dvc.yaml")) -> list[Path]:
    """params.yaml, dvc.lock and every output declared with `cache: false`."""
    paths = [Path("params.yaml"), Path("dvc.lock")]
    for stage in yaml.safe_load(dvc_yaml.read_text())["stages"].values():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind) or []:
                if isinstance(entry, dict):
                    paths += [Path(p) for p, opts in entry.items() if (opts or {}).get("cache") is False]
    return paths


def _copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(src, dest)
    else:
        shutil.copy2(src, dest)


def snapshot_workspace() -> None:
    """Save the workspace files; if a killed flow left a complete snapshot, restore that one
    first and keep it."""
    manifest = SNAPSHOT / "manifest.json"
    if manifest.exists():
        reattach_branch(restore_files())  # a mismatch is reported when the flow ends
        return
    shutil.rmtree(SNAPSHOT, ignore_errors=True)
    paths = workspace_files()
    for p in paths:
        if p.exists():
            _copy(p, SNAPSHOT / p)
    # Written last: only a complete snapshot is ever restored.
    write_json(manifest, {"paths": [str(p) for p in paths], "saved": [str(p) for p in paths if p.exists()],
                          "git_branch": _git("symbolic-ref", "-q", "--short", "HEAD"), "git_head": _git("rev-parse", "HEAD")})


def _git(*args: str) -> str | None:
    proc = subprocess.run(["git", *args], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def reattach_branch(manifest: dict[str, Any]) -> str | None:
    """`dvc exp run` detaches HEAD for the length of a run and re-attaches it when the run ends;
    a killed run leaves it detached, and the next commit would land on no branch. Put HEAD back on
    the branch it was on when the flow started, if HEAD is still at that branch's commit.
    Returns a warning when it cannot."""
    branch, head = manifest.get("git_branch"), manifest.get("git_head")
    if not branch or _git("symbolic-ref", "-q", "HEAD"):
        return None  # started detached, or HEAD is on a branch
    current, tip = _git("rev-parse", "HEAD"), _git("rev-parse", f"refs/heads/{branch}")
    if current != head or tip != head:
        return (f"HEAD is detached at {current}; the flow started on branch {branch!r} at {head}, which is now "
                f"at {tip}: check out the branch you want by hand")
    _git("symbolic-ref", "-m", "ablations: re-attach HEAD after a killed dvc exp run", "HEAD", f"refs/heads/{branch}")
    return None


def restore_files(only: tuple[str, ...] | None = None) -> dict[str, Any]:
    manifest = read_json(SNAPSHOT / "manifest.json")
    for p in map(Path, manifest["paths"]):
        if only and str(p) not in only:
            continue
        if str(p) in manifest["saved"]:
            _copy(SNAPSHOT / p, p)
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    return manifest


def restore_workspace(logger: Any) -> None:
    """The workspace as it was: the branch, the snapshot, then the cached data that dvc.lock names."""
    manifest = restore_files()
    warning = reattach_branch(manifest)
    if warning:
        logger.warning(warning)
    proc = subprocess.run(["dvc", "checkout", "--force"], capture_output=True, text=True)
    if proc.returncode != 0:
        logger.warning("dvc checkout after the ablations failed; run it by hand:\n%s", proc.stderr[-2000:])
    shutil.rmtree(SNAPSHOT)


@task(name="dvc-experiment", task_run_name="{run.name}")
def run_experiment(run: report_step.Run, runs_dir: Path, env: dict[str, str], baseline: str) -> None:
    logger = get_run_logger()
    # -S edits params.yaml in place: start each run from the saved one, not the last run's.
    restore_files(only=("params.yaml",))
    # A run that died after `dvc exp run` saved it but before its copy: replace it.
    subprocess.run(["dvc", "exp", "remove", run.name], capture_output=True)
    t0 = time.perf_counter()
    _stream(dvc_command(run), {**env, "PIPELINE_EXPERIMENT": run.name}, run.name, logger)
    seconds = time.perf_counter() - t0
    dest = runs_dir / run.name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    if run.rows:
        _stream(report_command(run, dest), {**env, "PIPELINE_EXPERIMENT": run.name}, run.name, logger)
    else:
        shutil.copy2("reports/summary.json", dest / "summary.json")
    # grpo's log is the one the ablation report plots (train_log.csv); every RL stage's is kept.
    if Path("data/grpo/train_log.csv").exists():
        shutil.copy2("data/grpo/train_log.csv", dest / "train_log.csv")
    # A stage with several policies keeps a log per policy (data/router/alpha_0/...): router_alpha_0_train_log.csv.
    for log in sorted(Path("data").rglob("train_log.csv")):
        shutil.copy2(log, dest / f"{'_'.join(log.parent.relative_to('data').parts)}_train_log.csv")
    # Written last: a copy without run.json is unfinished and is run again.
    write_json(dest / "run.json", {"name": run.name, "seed": run.seed, "overrides": run.overrides,
                                   "settings": run.settings, "rows": list(run.rows), "command": dvc_command(run),
                                   "baseline": baseline,
                                   "seconds": round(seconds, 1), "finished_unix": int(time.time())})
    logger.info("%s: done in %.0f s, copied to %s", run.name, seconds, dest)


@flow(name="livethinking-ablations", log_prints=True)
def ablations(only: list[str] | None = None, dry_run: bool = False, variants_file: str = "ablations.yaml",
              runs_dir: str = str(RUNS), out: str = "reports") -> dict[str, Any]:
    """Run the planned experiments that have no copy yet, then write the report."""
    from steps.core.config import load_params

    logger = get_run_logger()
    params = load_params()
    from steps.core.registry import load_registry

    rows = load_registry(params=params)
    variants = report_step.load_variants(variants_file, params, rows=rows)
    unknown = sorted(set(only or []) - {v.name for v in variants})
    if unknown:
        raise ValueError(f"{variants_file}: no variant(s) {unknown}; known: {[v.name for v in variants]}")
    chosen = [v for v in variants if not only or v.name in only]
    runs = report_step.plan_runs(chosen, (params.get("base") or {}).get("seed", 0), report_step.seed_keys(rows), rows)
    baseline = baseline_digest()
    todo = [r for r in runs if not is_copied(r, Path(runs_dir), baseline)]
    for r in runs:
        logger.info("%-28s %s  %s", r.name, "to run " if r in todo else "copied ", " ".join(dvc_command(r)))
    if dry_run:
        return {}
    run_all("ablations", todo, Path(runs_dir), logger, baseline)
    return report_step.main(["--variants", variants_file, "--runs", runs_dir, "--out", out])


def run_all(name: str, todo: list[report_step.Run], runs_dir: Path, logger: Any, baseline: str) -> None:
    """The runs one after the other under one MLflow parent run, the workspace put back after
    (also after a failure; a killed flow's snapshot is restored at the next start)."""
    from steps.core import tracking

    if not todo and not SNAPSHOT.exists():
        return
    snapshot_workspace()
    try:
        with tracking.pipeline_run(name, {"runs": [r.name for r in todo]}) as parent:
            env = {"MLFLOW_PARENT_RUN_ID": parent} if parent else {}
            for r in todo:
                run_experiment(r, runs_dir, env, baseline)
    finally:
        restore_workspace(logger)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only these variants (the report covers all copies)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the dvc commands, run nothing")
    ap.add_argument("--variants", default="ablations.yaml")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    try:
        ablations(only=args.only, dry_run=args.dry_run, variants_file=args.variants)
    except StageFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
