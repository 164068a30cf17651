"""The pipeline as a Prefect flow: one task per DVC stage, run in dvc.yaml's order.

Each task runs `dvc repro --single-item <stage>`, so DVC's cache decides whether the stage
has anything to do (an unchanged stage is skipped in a second or two) and the flow adds
orchestration, logs, retries of nothing but I/O, and an MLflow parent run under which every
stage logs a nested run.

    python -m flows.pipeline                      # the main job, ephemeral Prefect, no server
    python -m flows.pipeline --stages grpo evaluate export   # a part of it
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task

STAGES = ("ingest", "pretrain_demo", "sample", "judge", "rft", "grpo", "evaluate", "export")


class StageFailed(RuntimeError):
    pass


def stage_names(dvc_yaml: Path = Path("dvc.yaml")) -> list[str]:
    """Stages in dvc.yaml order (the file is the single source of truth)."""
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, env: dict[str, str], force: bool = False) -> str:
    """Run one DVC stage and stream its log into the task log."""
    logger = get_run_logger()
    cmd = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    logger.info("$ %s", " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env={**os.environ, **env}, bufsize=1) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            # tqdm redraws with carriage returns: keep only the last state of a line.
            line = line.split("\r")[-1]
            if line.strip():
                tail.append(line)
                logger.info("%s | %s", stage, line)
    if proc.returncode != 0:
        raise StageFailed(f"stage {stage} failed (exit {proc.returncode}); last lines:\n" + "\n".join(tail))
    return stage


@flow(name="livethinking-pipeline", log_prints=True)
def pipeline(stages: list[str] | None = None, force: bool = False) -> dict[str, Any]:
    """Run the stages in order under one MLflow parent run; returns reports/summary.json."""
    from steps.core import tracking
    from steps.core.config import load_params
    from steps.core.io import read_json

    todo = stages or stage_names()
    with tracking.pipeline_run("pipeline", load_params()) as parent:
        env = {"MLFLOW_PARENT_RUN_ID": parent} if parent else {}
        for stage in todo:
            run_stage(stage, env, force)
    summary = Path("reports/summary.json")
    return read_json(summary) if summary.exists() else {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="*", help="run only these stages (default: all, in dvc.yaml order)")
    ap.add_argument("--force", action="store_true", help="re-run stages even when DVC finds them up to date")
    args = ap.parse_args(argv)
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
