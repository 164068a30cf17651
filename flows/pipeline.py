"""The pipeline as a Prefect flow: one task per DVC stage, run in dvc.yaml's order.

Each task runs `dvc repro --single-item <stage>`, so DVC's cache decides whether the stage
has anything to do (an unchanged stage is skipped in a second or two) and the flow adds
orchestration, logs, and an MLflow parent run under which every stage logs a nested run.

`runner: docker` in params.yaml (section `runner`) runs each stale stage in its own container
instead (flows/docker_runner.py) and then records it with `dvc commit`, so DVC's view stays
the same whichever runner did the work. `runner: kubernetes` runs it as a Kubernetes Job from
its stage family's work pool (flows/k8s.py), then records it the same way.

    python -m flows.pipeline                      # the main job, ephemeral Prefect, no server
    python -m flows.pipeline --stages grpo evaluate export   # a part of it
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

class StageFailed(RuntimeError):
    pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM (a `kill`, a scheduler's stop, `timeout`) into SystemExit, as Ctrl-C already
    is: Prefect stops its ephemeral API server (a uvicorn child) from an atexit hook, which a
    process killed by the default SIGTERM action never runs, and the server was left behind."""
    import signal

    def _exit(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _exit)


def stage_names(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stages in dvc.yaml order (the file is the single source of truth), `foreach` stages
    expanded as DVC names them (evaluate@teacher, evaluate@rft, ...): one task each."""
    from flows.docker_runner import resolved_stages

    return list(resolved_stages(dvc_yaml))


def _stream(cmd: list[str], env: dict[str, str], stage: str, logger: Any) -> None:
    logger.info("$ %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **env}, bufsize=1) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                line = line.rstrip("\n")
                # tqdm redraws with carriage returns: keep only the last state of a line.
                line = line.split("\r")[-1]
                if line.strip():
                    tail.append(line)
                    logger.info("%s | %s", stage, line)
        except BaseException:
            # Stopped (SIGTERM, Ctrl-C, a failure): stop the stage too rather than wait for it;
            # DVC releases its lock and the stage's own writes are atomic, so a re-run resumes.
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))


def is_stale(stage: str, env: dict[str, str]) -> bool:
    """DVC's own verdict on one stage (its upstream is already up to date: stages run in order)."""
    out = subprocess.run(["dvc", "status", "--json", stage], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout
    return bool(json.loads(out or "{}"))


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, env: dict[str, str], force: bool = False, runner: dict[str, Any] | None = None) -> str:
    """Run one DVC stage (locally or in its container) and stream its log into the task log."""
    logger = get_run_logger()
    runner = runner or {"kind": "local"}
    if runner.get("kind", "local") == "local":
        _stream(["dvc", "repro", "--single-item", stage] + (["--force"] if force else []), env, stage, logger)
        return stage
    from flows.docker_runner import DockerRunnerConfig, StageContainerFailed, run_stage_container

    if not force and not is_stale(stage, env):
        logger.info("%s is up to date", stage)
        return stage
    options = {k: v for k, v in runner.items() if k != "kind"}
    if runner["kind"] == "kubernetes":
        from flows.k8s import K8sRunnerConfig, run_stage_job

        try:  # a Job from the stage family's work pool; the workspace volume is this pod's /app
            run_stage_job(stage, K8sRunnerConfig(**options), log=logger.info, environ={**os.environ, **env})
        except RuntimeError as e:
            raise StageFailed(f"stage {stage} failed as a Kubernetes job: {e}") from None
        _stream(["dvc", "commit", "--force", stage], env, stage, logger)
        return stage
    cfg = DockerRunnerConfig(workspace=os.environ.get("LIVETHINKING_WORKSPACE", os.getcwd()), **options)
    try:
        run_stage_container(stage, cfg, log=logger.info, environ={**os.environ, **env})  # lines come as "stage | ..."
    except StageContainerFailed as e:
        raise StageFailed(str(e)) from None
    _stream(["dvc", "commit", "--force", stage], env, stage, logger)
    return stage


@flow(name="livethinking-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False,
             runner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the stages in order under one MLflow parent run; returns reports/summary.json.
    `runner` replaces params.yaml's `runner` section (a deployment sets it per target)."""
    from steps.core import tracking
    from steps.core.config import load_params
    from steps.core.io import read_json

    from steps.core.registry import load_registry, side_stages

    # The main job: the sibling methods' rows (main: false) are `dvc repro`'s and `make compare`'s.
    todo = stages or [s for s in stage_names() if s not in side_stages(load_registry())]
    params = load_params()
    runner = runner or params.get("runner") or {"kind": "local"}
    if runner.get("kind", "local") not in ("local", "docker", "kubernetes"):
        raise ValueError(f"params.yaml: runner.kind must be local, docker or kubernetes, got {runner.get('kind')!r}")
    with tracking.pipeline_run("pipeline", params) as parent:
        env = {"MLFLOW_PARENT_RUN_ID": parent} if parent else {}
        for stage in todo:
            run_stage(stage, env, force, runner)
    summary = Path("reports/summary.json")
    return read_json(summary) if summary.exists() else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="*", help="run only these stages (default: all, in dvc.yaml order)")
    ap.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    try:
        pipeline(stages=args.stages, force=args.force)
    except StageFailed as e:
        print(e, file=sys.stderr)
        return 1
    md = Path("reports/summary.md")
    if md.exists():
        print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
