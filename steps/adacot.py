"""adacot: AdaCoT (arXiv 2505.11896) from the RFT model — CoT triggering as Pareto optimisation.

AdaCoT publishes no code; this is how each piece of the paper was read:
- **Reward.** R = R_base - alpha_1 * P_miss - alpha_2 * P_over - gamma * P_fmt, where P_miss
  flags a response that left out a CoT the query needed, P_over one that used a CoT the query did
  not need, P_fmt a broken think format. Here R_base is the judge's correctness (the
  `correctness` reward, shared with every stage) and the penalties are the `adacot_trigger`
  reward (steps/core/rewards/hybrid.py), coefficients `missed_cot`, `unneeded_cot`, `bad_format`
  in params. Raising `unneeded_cot` against `missed_cot` moves the trigger boundary towards
  fewer CoTs: a sweep of the two (ablations.yaml) traces the trigger-rate-vs-correctness curve
  the paper draws as its Pareto front.
- **"Needed a CoT".** The paper labels each query with an LLM against written principles. Our
  examples carry their hop count (`hops`), and a multi-hop question is the one that needs its
  chain written out: `min_hops` (default 2) and up need thinking. An example without `hops` gets
  no trigger penalty.
- **Selective Loss Masking.** The paper trains in stages; in a stage whose data all lean one way
  (its math RL, where every query wants a CoT) the triggering decision would collapse towards
  it, so the loss of the decision token — the first token after `<think>` — is masked out there,
  and the stage improves the answers while the boundary learnt before stays where it was. The
  stage here runs that as its first phase (`slm_steps` > 0): the prompts that need a CoT only,
  the base reward only (`slm_rewards`), the decision token masked (the `adacot` rollout with
  `mask_decision`, steps/core/rollouts/hybrid.py: mask 0 = no loss); then the second phase
  (`max_steps`) on every prompt with the trigger penalties and the decision token trained.
  `slm_steps: 0` (the default) runs the second phase alone.
- **Optimiser.** The paper uses PPO with a value model; we use the shared GRPO trainer (group
  z-scored advantages, no critic), as every RL method here, so the methods differ in their
  rewards and rollouts only.
- **Starting point.** The paper's SFT stage already mixes CoT and no-CoT responses, so RL starts
  from a model that can do both; our RFT model was trained on thinking traces only, and the
  no-think branch is found by sampling (the same starting point as AdaptThink, which forces it).

Input: rft/model, ingest/train.jsonl. Output: model/, metrics.json, train_log.csv (the SLM
phase's log as slm_train_log.csv).
"""
from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from steps.core import launch
from steps.core.config import help_field, load_config
from steps.core.rewards import check_spec
from steps.core.rl import RLConfig, finish_stage, prompt_rows, train_rl
from steps.core.schemas import EXAMPLES, read_validated


@dataclass(frozen=True)
class AdacotConfig(RLConfig):
    rewards: dict = field(default_factory=lambda: {
        "correctness": {"weight": 1.0},
        "adacot_trigger": {"weight": 1.0, "missed_cot": 1.0, "unneeded_cot": 0.5, "bad_format": 1.0, "min_hops": 2}},
        metadata={"help": "R_base (correctness) and the trigger penalties (adacot_trigger)"})
    protocol: str = help_field("adacot", "the rollout that can mask the decision token (steps/core/rollouts/hybrid.py)")
    slm_steps: int = help_field(0, "steps of the Selective Loss Masking phase (0: none)", ge=0)
    slm_rewards: dict = field(default_factory=lambda: {"correctness": {"weight": 1.0}},
                              metadata={"help": "the SLM phase's rewards (the base reward: no trigger penalty)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if "adacot_trigger" not in self.rewards:
            raise ValueError("rewards: AdaCoT needs the adacot_trigger reward (its trigger penalties)")
        check_spec(self.slm_rewards, "slm_rewards")

    @property
    def min_hops(self) -> int:
        return int((self.rewards["adacot_trigger"] or {}).get("min_hops", 2))


def needing_cot(rows: list[dict[str, Any]], min_hops: int) -> list[dict[str, Any]]:
    """The prompts whose example needs a CoT (hops >= min_hops); unlabelled ones are left out."""
    from steps.core.rewards.hybrid import needs_cot

    return [r for r in rows if needs_cot(r.get("hops"), min_hops)]


def train_adacot(cfg: AdacotConfig, rows: list[dict[str, Any]], policy: str, out: Path) -> dict[str, Any]:
    """The SLM phase (if any), then the trigger phase from its model."""
    result: dict[str, Any] = {"metrics": {}}
    if cfg.slm_steps:
        slm_rows = needing_cot(rows, cfg.min_hops)
        if not slm_rows:
            raise ValueError(f"adacot.slm_steps={cfg.slm_steps} needs prompts that need a CoT (hops >= "
                             f"{cfg.min_hops}); none of the {len(rows)} training examples has one")
        # A plain RL config: the SLM phase has no trigger penalty to require.
        slm_cfg = RLConfig(**{**{f.name: getattr(cfg, f.name) for f in fields(RLConfig)},
                              "rewards": cfg.slm_rewards, "max_steps": cfg.slm_steps,
                              "protocol_options": {**cfg.protocol_options, "mask_decision": True}})
        slm = train_rl(slm_cfg, slm_rows, policy, out / "slm")
        policy = str(out / "slm" / "model")
        result["slm_history"] = slm["history"]
        result["metrics"].update({f"slm_{k}": v for k, v in slm["metrics"].items()})
        result["metrics"]["slm_prompts"] = len(slm_rows)
    main = train_rl(replace(cfg, protocol_options={**cfg.protocol_options, "mask_decision": False}), rows, policy, out)
    if launch.is_main():
        shutil.rmtree(out / "slm", ignore_errors=True)  # the intermediate model is not an output
    result["history"] = main["history"]
    result["metrics"].update(main["metrics"])
    result["metrics"]["labelled_prompts"] = sum(r.get("hops") is not None for r in rows)
    return result


def main(argv: list[str] | None = None) -> None:
    from steps.core.io import write_train_log

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--out", default="data/adacot")
    args = ap.parse_args(argv)
    cfg = load_config(AdacotConfig, "adacot", args.params)
    if launch.relaunched("steps.adacot", cfg.launcher, argv, args.params, "adacot"):
        return
    rows = prompt_rows(cfg, read_validated(args.data, EXAMPLES), args.rft)
    out = Path(args.out)
    result = train_adacot(cfg, rows, args.rft, out)
    write_train_log(out / "slm_train_log.csv", result.pop("slm_history", []))
    finish_stage("adacot", cfg, args.rft, out, result)


if __name__ == "__main__":
    main()
