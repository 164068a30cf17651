"""dler: the DLER length baseline (arXiv 2510.15110) beside LiveThinking's GRPO, from the same RFT model.

A plain truncation penalty (steps/core/rewards/dler.py: correctness, 0 over `max_tokens`) with
DLER's optimisation fixes, on the shared RL trainer (steps/core/rl.py):
- batch-level reward normalisation (`advantage: batch`: the group mean removed, divided by the
  standard deviation of the whole batch instead of the group's);
- a higher upper clip (`epsilon_high` 0.28 against `epsilon` 0.2, DAPO's clip-higher); the clip
  acts only when a generation batch is reused, hence `num_iterations: 2` in params.

Where we depart: DLER also uses dynamic sampling (groups whose rewards are all equal are dropped
and the batch is refilled); TRL's trainer has no refill, and such groups already get zero
advantage, so they only dilute the batch — not implemented. DLER truncates rollouts at the
target; we score completed over-long responses 0 instead (same reward, see the reward module).

Input: rft/model, ingest/train.jsonl. Output: model/, metrics.json, train_log.csv.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from steps.core import launch
from steps.core.config import help_field, load_config
from steps.core.rl import RLConfig, finish_stage, prompt_rows, train_rl
from steps.core.schemas import EXAMPLES, read_validated


@dataclass(frozen=True)
class DlerConfig(RLConfig):
    rewards: dict = field(default_factory=lambda: {"truncated_correctness": {"weight": 1.0}},
                          metadata={"help": "reward name -> {weight, options}; DLER: truncated_correctness"})
    advantage: Literal["group", "batch", "none", "raw"] = help_field("batch", "DLER: batch-level normalisation")
    epsilon_high: float | None = help_field(0.28, "DLER's higher upper clip", ge=0.0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--out", default="data/dler")
    args = ap.parse_args(argv)
    cfg = load_config(DlerConfig, "dler", args.params)
    if launch.relaunched("steps.dler", cfg.launcher, argv, args.params, "dler"):
        return
    rows = prompt_rows(cfg, read_validated(args.data, EXAMPLES), args.rft)
    out = Path(args.out)
    finish_stage("dler", cfg, args.rft, out, train_rl(cfg, rows, args.rft, out))


if __name__ == "__main__":
    main()
