"""Every registered method on the embedded default with its seeds, then the methods report.

The methods are the trained rows of params.yaml `models` (rft, rft_grpo, dler, ... and whatever
a new method adds); each lists its seeds. One run per seed: `dvc exp run -n default-s<seed>
-S <stage>.seed=<seed> ... report` for every trained stage, so a run at seed s trains every
method at seed s, and DVC restores what a run has already made (the teacher, the student base and
their evaluations are made once). Runs are copied to reports/compare/runs/<run>/ and skipped when
their copy exists and was made from the same baseline (params, pipeline, lock, code), so an
interrupted flow resumes and a changed workspace runs again; the workspace is put back at the end
(the ablations flow's runner). Then steps/methods.py writes reports/methods.{json,md} and
reports/plots/methods_pareto.png.

    python -m flows.compare            # make compare
    python -m flows.compare --dry-run  # the plan and its dvc commands
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows.ablations import baseline_digest, dvc_command, is_copied, run_all
from flows.pipeline import StageFailed, exit_on_sigterm
from steps import ablations as A
from steps import methods as report_step

RUNS = Path("reports/compare/runs")


def plan(rows: dict[str, Any], base_seed: int) -> list[A.Run]:
    """The ablations' plan for one variant per trained row, each run evaluating every fixed row
    too: a fixed row that no method is compared to (route_student_base: the router pool's weakest
    member alone) is still a reference of the report. Their evaluations are made once; the other
    runs get them from DVC's run cache."""
    fixed = {n for n, r in rows.items() if r.fixed}
    return [replace(r, rows=tuple(n for n in rows if n in fixed or n in r.rows))
            for r in A.plan_runs(report_step.variants(rows), base_seed, A.seed_keys(rows), rows)]


@flow(name="livethinking-compare", log_prints=True)
def compare(dry_run: bool = False, runs_dir: str = str(RUNS), out: str = "reports") -> dict[str, Any]:
    """Run the seeds that have no copy yet, then write the methods report."""
    from steps.core.config import load_params
    from steps.core.registry import load_registry

    logger = get_run_logger()
    params = load_params()
    rows = load_registry(params=params)
    runs = plan(rows, (params.get("base") or {}).get("seed", 0))
    baseline = baseline_digest()
    todo = [r for r in runs if not is_copied(r, Path(runs_dir), baseline)]
    for r in runs:
        logger.info("%-16s %s  %s", r.name, "to run " if r in todo else "copied ", " ".join(dvc_command(r)))
    if dry_run:
        return {}
    run_all("compare", todo, Path(runs_dir), logger, baseline)
    return report_step.main(["--runs", runs_dir, "--out", out])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="print the plan and the dvc commands, run nothing")
    args = ap.parse_args(argv)
    exit_on_sigterm()
    try:
        compare(dry_run=args.dry_run)
    except StageFailed as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
