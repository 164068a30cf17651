"""grpo: LiveThinking's reinforcement learning for reasoning efficiency, on top of the RFT model.

Reward per completion j:  r_j = w_c * C + w_h * H + w_l * r_length (+ w_g * grounding)
(steps/core/rewards/livethinking.py), with C and H from the same judge as the judge stage (one
verdict per completion) and L_ref measured here from the starting policy's own outputs:
`ref_samples` sampled completions per prompt at the GRPO temperature, averaged. The starting
policy is the RFT model, or the student base with `init: student_base` (the "GRPO only" ablation).

The rest is the shared RL trainer (steps/core/rl.py): the plain rollout, group z-score
advantages over the K completions of a prompt (the paper's), the KL penalty beta. The paper's
clipped ratio acts only when a generation batch is optimised more than once: with the default
`num_iterations: 1` the ratio is exactly 1 (TRL logs clip_ratio 0) and the update is the
policy gradient with group-normalised advantages; `num_iterations: 2` makes the clip (epsilon)
act, at twice the optimisation cost per rollout.

Input: rft/model (or the student base in pretrain_demo/models.json), ingest/train.jsonl.
Output: model/, ref_lengths.jsonl, metrics.json, train_log.csv (every reward component,
completion length, KL per logging step).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steps.core.backends import SamplingParams, TransformersBackend
from steps.core import launch
from steps.core.config import help_field, load_config
from steps.core.io import read_json, write_jsonl
from steps.core.rl import RLConfig, train_rl
from steps.core.schemas import EXAMPLES, read_validated


@dataclass(frozen=True)
class GrpoConfig(RLConfig):
    # The reward options' defaults live in their factories (steps/core/rewards/livethinking.py).
    rewards: dict = field(default_factory=lambda: {"correctness": {"weight": 2.0}, "helpfulness": {"weight": 2.0},
                                                   "length": {"weight": 1.0}, "grounding": {"weight": 1.0}},
                          metadata={"help": "reward name -> {weight, options} (python -m steps.core.rewards list)"})
    init: Literal["rft", "student_base"] = help_field("rft", "starting policy: the RFT model, or the student base "
                                                             "(GRPO without RFT)")
    ref_samples: int = help_field(2, "samples per prompt of the starting policy that define L_ref", ge=1)


def measure_ref_lengths(model_dir: str, rows: list[dict[str, Any]], cfg: GrpoConfig) -> list[float]:
    """L_ref per prompt: mean length of `ref_samples` completions of the starting policy."""
    backend = TransformersBackend(model_dir, batch_size=64, threads=cfg.threads)
    from steps.core.prompts import Prompt
    prompts = [Prompt(messages=(), text=r["prompt"], key=r["id"]) for r in rows]
    outs = backend.generate(prompts, SamplingParams(n=cfg.ref_samples, temperature=cfg.temperature,
                                                    max_new_tokens=cfg.max_completion_length, seed=cfg.seed))
    return [sum(c.completion_tokens for c in cs) / len(cs) for cs in outs]


def train_grpo(cfg: GrpoConfig, rows: list[dict[str, Any]], policy: str, out_dir: Path) -> dict[str, Any]:
    return train_rl(cfg, rows, policy, out_dir)


def main(argv: list[str] | None = None) -> None:
    from steps.core.rl import finish_stage, prompt_rows

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--models", default="data/pretrain_demo/models.json", help="holds the student base (init: student_base)")
    ap.add_argument("--out", default="data/grpo")
    args = ap.parse_args(argv)
    cfg = load_config(GrpoConfig, "grpo", args.params)
    if launch.relaunched("steps.grpo", cfg.launcher, argv, args.params, "grpo"):
        return
    policy = args.rft if cfg.init == "rft" else read_json(args.models)["student_base"]
    rows = prompt_rows(cfg, read_validated(args.data, EXAMPLES), policy)
    ref = measure_ref_lengths(policy, rows, cfg)
    for r, length in zip(rows, ref):
        r["ref_length"] = length
    out = Path(args.out)
    write_jsonl(out / "ref_lengths.jsonl", [{"id": r["id"], "dataset": r["dataset"], "ref_length": r["ref_length"]}
                                            for r in rows])
    result = train_grpo(cfg, rows, policy, out)
    result["metrics"]["mean_ref_length"] = sum(ref) / len(ref)
    finish_stage("grpo", cfg, policy, out, result)


if __name__ == "__main__":
    main()
