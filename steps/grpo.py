"""grpo: reinforcement learning for reasoning efficiency on top of the RFT model.

Reward per completion j:  r_j = w_c * C + w_h * H + w_l * r_length  (steps.core.rewards), with
C and H from the same judge as the judge stage and L_ref measured here from the starting
policy's own outputs: `ref_samples` sampled completions per prompt at the GRPO temperature,
averaged. The starting policy is the RFT model, or the student base with `init: student_base`
(the "GRPO only" ablation).
TRL's GRPOTrainer supplies the rest of the paper's objective: group z-score advantages over
the K generations of a prompt (`scale_rewards: group`), the clipped ratio with clip eta
(`epsilon`) and the KL penalty beta (`beta`). Rewards are registered by name, so other
methods' rewards (AdaptThink, Router-R1, RelayLLM) plug in through params alone.

Input: rft/model (or the student base in pretrain_demo/models.json), ingest/train.jsonl.
Output: model/, ref_lengths.jsonl, metrics.json, train_log.csv (every reward component,
completion length, KL per logging step).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steps.core import training
from steps.core.backends import SamplingParams, TransformersBackend
from steps.core.config import help_field, load_config
from steps.core.io import read_json, write_json, write_jsonl, write_train_log
from steps.core.rewards import REWARDS, make_rewards
from steps.core.schemas import EXAMPLES, read_validated

DEFAULT_REWARDS = {"correctness": {"weight": 1.0}, "helpfulness": {"weight": 1.0},
                   "length": {"weight": 1.0, "lambda_lower": 0.2, "lambda_upper": 0.45, "epsilon_frac": 0.5}}


@dataclass(frozen=True)
class GrpoConfig:
    init: Literal["rft", "student_base"] = help_field("rft", "starting policy: the RFT model, or the student base "
                                                             "(GRPO without RFT)")
    rewards: dict = field(default_factory=lambda: dict(DEFAULT_REWARDS),
                          metadata={"help": "reward name -> {weight, options}; see steps.core.rewards"})
    num_generations: int = help_field(8, "K: completions per prompt (the GRPO group)")
    prompts_per_step: int = help_field(4, "prompts per optimiser step (x K completions)")
    max_steps: int = help_field(150, "optimiser steps")
    max_prompts: int = help_field(512, "training prompts drawn from the train split")
    learning_rate: float = help_field(2e-4, "peak learning rate")
    warmup_ratio: float = help_field(0.05, "share of steps spent warming up")
    beta: float = help_field(0.0, "KL coefficient beta (0: no reference model)")
    lambda_aux: float | None = help_field(None, "MoE load-balancing loss weight; None: the model config's own")
    epsilon: float = help_field(0.2, "clip eta of the ratio objective")
    temperature: float = help_field(1.0, "rollout temperature")
    max_completion_length: int = help_field(160, "rollout budget in tokens")
    ref_samples: int = help_field(2, "RFT samples per prompt that define L_ref")
    loss_type: str = help_field("grpo", "TRL loss type (grpo = the paper's per-sequence mean)")
    scale_rewards: str = help_field("group", "advantage normalisation: group z-score")
    bf16: bool | None = help_field(None, "None: on GPU only")
    threads: int = help_field(2, "torch CPU threads")
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true}"})
    seed: int = help_field(0, "null: base.seed; changing it alone re-runs grpo and evaluate only")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rewards) - set(REWARDS))
        if unknown:
            raise ValueError(f"rewards {unknown} are not registered; known: {sorted(REWARDS)}")
        if self.num_generations < 2:
            raise ValueError("num_generations must be >= 2: advantages are relative within a group")
        if "length" in self.rewards:
            lo, hi = (self.rewards["length"].get(k, v) for k, v in (("lambda_lower", 0.0), ("lambda_upper", 0.5)))
            if not 0 <= lo <= hi:
                raise ValueError(f"length reward needs 0 <= lambda_lower <= lambda_upper, got {lo}, {hi}")


def measure_ref_lengths(model_dir: str, rows: list[dict[str, Any]], cfg: GrpoConfig) -> list[float]:
    """L_ref per prompt: mean length of `ref_samples` completions of the starting policy."""
    backend = TransformersBackend(model_dir, batch_size=64, threads=cfg.threads)
    from steps.core.prompts import Prompt
    prompts = [Prompt(messages=(), text=r["prompt"], key=r["id"]) for r in rows]
    outs = backend.generate(prompts, SamplingParams(n=cfg.ref_samples, temperature=cfg.temperature,
                                                    max_new_tokens=cfg.max_completion_length, seed=cfg.seed))
    return [sum(c.completion_tokens for c in cs) / len(cs) for cs in outs]


def train_grpo(cfg: GrpoConfig, rows: list[dict[str, Any]], policy: str, out_dir: Path) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    training.set_threads(cfg.threads)
    reward_fns, weights = make_rewards(cfg.rewards)
    is_moe = hasattr(AutoConfig.from_pretrained(policy), "output_router_logits")
    batch = cfg.prompts_per_step * cfg.num_generations
    args = GRPOConfig(**training.common_args(out_dir / "checkpoints", seed=cfg.seed, learning_rate=cfg.learning_rate,
                                             batch_size=batch, max_steps=cfg.max_steps, epochs=1.0,
                                             warmup_ratio=cfg.warmup_ratio, logging_steps=5, bf16=cfg.bf16),
                      num_generations=cfg.num_generations, generation_batch_size=batch,
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                      beta=cfg.beta, epsilon=cfg.epsilon, loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards,
                      reward_weights=weights, remove_unused_columns=False, log_completions=False,
                      router_aux_loss_coef=cfg.lambda_aux,
                      # Rollouts must not compute the MoE router loss: with padded, cached
                      # generation it fails in transformers; TRL asks for router logits in the
                      # training forward pass itself.
                      model_init_kwargs={"output_router_logits": False} if is_moe else None)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    # GRPO builds its reference model from the policy's path, so pass the directory.
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_fns, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    result = trainer.train()
    trainer.model.config.use_cache = True
    trainer.save_model(str(out_dir / "model"))
    tokenizer.save_pretrained(out_dir / "model")
    history = training.history_rows(trainer.state.log_history)
    last = next((h for h in reversed(history) if "reward" in h), {})
    metrics = {"train_loss": float(result.training_loss), "steps": int(result.global_step),
               "final_reward": last.get("reward"),
               "final_completion_length": last.get("completions/mean_length")}
    return {"history": history, "metrics": metrics}


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.core import modeling, tracking
    from steps.core.lineage import write_meta

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--models", default="data/pretrain_demo/models.json", help="holds the student base (init: student_base)")
    ap.add_argument("--out", default="data/grpo")
    args = ap.parse_args(argv)
    cfg = load_config(GrpoConfig, "grpo", args.params)
    policy = args.rft if cfg.init == "rft" else read_json(args.models)["student_base"]
    examples = read_validated(args.data, EXAMPLES)[: cfg.max_prompts]
    rows = training.prompt_rows(examples, AutoTokenizer.from_pretrained(policy), cfg.chat_template_kwargs)
    ref = measure_ref_lengths(policy, rows, cfg)
    for r, length in zip(rows, ref):
        r["ref_length"] = length
    out = Path(args.out)
    write_jsonl(out / "ref_lengths.jsonl", [{"id": r["id"], "dataset": r["dataset"], "ref_length": r["ref_length"]}
                                            for r in rows])
    result = train_grpo(cfg, rows, policy, out)
    result["metrics"]["mean_ref_length"] = sum(ref) / len(ref)
    modeling.save_profile(AutoModelForCausalLM.from_pretrained(out / "model"), out / "model")
    write_meta(out / "model", "grpo", cfg, parent=policy, metrics=result["metrics"])
    write_json(out / "metrics.json", result["metrics"])
    write_train_log(out / "train_log.csv", result["history"])
    tracking.log_stage("grpo", cfg, metrics={k: v for k, v in result["metrics"].items() if isinstance(v, (int, float))},
                       history=result["history"])
    print(f"grpo: {result['metrics']}")


if __name__ == "__main__":
    main()
