"""rft: rejection-sampling fine-tuning of the student on the judge-filtered teacher traces.

Input: judge/kept.jsonl, ingest/train.jsonl (to rebuild prompts), pretrain_demo/models.json
(the student base). Output: model/ (weights, tokenizer, generation config, meta.json,
flops_profile.json), metrics.json and train_log.csv.

Loss: L_total = L_SFT + lambda_aux * L_aux. TRL's SFTTrainer computes L_SFT on completion
tokens only; for a Mixture-of-Experts student the model returns the router load-balancing
loss L_aux and the trainer adds it with `router_aux_loss_coef` = `lambda_aux` (0 for dense
models, where the term does not exist).

Scale-out: `launcher` runs the stage under `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO;
steps/core/launch.py); `batch_size` is the global batch, split over the processes.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core import launch, training
from steps.core.config import help_field, load_config
from steps.core.io import InputError, read_json
from steps.core.schemas import EXAMPLES, JUDGED, read_validated


@dataclass(frozen=True)
class RftConfig:
    base_model: str | None = help_field(None, "student override; default: pretrain_demo/models.json student_base")
    epochs: float = help_field(3.0, "passes over the kept set (ignored when max_steps > 0)", gt=0.0)
    max_steps: int = help_field(-1, "optimiser steps; -1 means use epochs", ge=-1)
    learning_rate: float = help_field(1e-3, "peak learning rate (cosine schedule)", gt=0.0)
    warmup_ratio: float = help_field(0.05, "share of steps spent warming up", ge=0.0, lt=1.0)
    batch_size: int = help_field(32, "sequences per optimiser step (split over the launcher's processes)", ge=1)
    lambda_aux: float | None = help_field(0.01, "MoE load-balancing loss weight; None: the model config's own",
                                        ge=0.0)
    max_length: int = help_field(512, "tokens per training sequence (prompt + completion)", ge=1)
    bf16: bool | None = help_field(None, "None: on GPU only")
    threads: int = help_field(2, "torch CPU threads", ge=1)
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true}"})
    seed: int = help_field(0, "null: base.seed; changing it alone re-runs rft, grpo and evaluate only",
                           ge=0)
    launcher: dict = field(default_factory=dict, metadata={
        "help": "{config: infra/accelerate/<ddp|fsdp|zero2|zero3>.yaml, num_processes: N}; empty: one process "
                "(steps/core/launch.py)"})

    def __post_init__(self) -> None:
        launch.parse(self.launcher)


def sft_rows(examples: list[dict[str, Any]], kept: list[dict[str, Any]], tokenizer: Any,
             chat_template_kwargs: dict[str, Any]) -> list[dict[str, str]]:
    by_id = {e["id"]: e for e in examples}
    missing = sorted({k["id"] for k in kept} - set(by_id))
    if missing:
        raise InputError(f"kept candidates refer to unknown example ids: {missing[:5]}")
    prompts = {r["id"]: r["prompt"] for r in training.prompt_rows(
        [by_id[i] for i in {k["id"] for k in kept}], tokenizer, chat_template_kwargs)}
    return [{"prompt": prompts[k["id"]], "completion": k["completion"]} for k in kept]


def train_sft(cfg: RftConfig, rows: list[dict[str, str]], base_model: str, out_dir: Path,
              stage_name: str = "rft") -> dict[str, Any]:
    """Fine-tune `base_model` on prompt/completion rows with TRL; saves to out_dir/model.
    Returns {"history": [...], "metrics": {...}}."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    if not rows:
        raise InputError(f"{stage_name}: nothing to train on (the judge kept no candidate)")
    training.set_threads(cfg.threads)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    is_moe = hasattr(model.config, "router_aux_loss_coef")
    args = SFTConfig(**training.common_args(out_dir / "checkpoints", seed=cfg.seed, learning_rate=cfg.learning_rate,
                                            batch_size=cfg.batch_size, max_steps=cfg.max_steps, epochs=cfg.epochs,
                                            warmup_ratio=cfg.warmup_ratio, logging_steps=5, bf16=cfg.bf16,
                                            batch_key=f"{stage_name}: batch_size"),
                     max_length=cfg.max_length, completion_only_loss=True, packing=False,
                     router_aux_loss_coef=cfg.lambda_aux if is_moe else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    result = trainer.train()
    model_dir = out_dir / "model"
    trainer.model.config.use_cache = True
    trainer.save_model(str(model_dir))  # on the main process (FSDP / ZeRO-3: gathered from every one)
    if launch.is_main():
        tokenizer.save_pretrained(model_dir)
    launch.wait_for_everyone()  # the model is complete on disk before any process reads it back
    history = training.history_rows(trainer.state.log_history)
    losses = [h["loss"] for h in history if "loss" in h]
    aux = [h["aux_loss"] for h in history if "aux_loss" in h]
    metrics = {"train_loss": float(result.training_loss), "final_loss": losses[-1] if losses else None,
               "final_aux_loss": aux[-1] if aux else None, "steps": int(result.global_step),
               "train_rows": len(rows), "moe": is_moe}
    return {"history": history, "metrics": metrics}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--kept", default="data/judge/kept.jsonl")
    ap.add_argument("--models", default="data/pretrain_demo/models.json")
    ap.add_argument("--out", default="data/rft")
    args = ap.parse_args(argv)
    cfg = load_config(RftConfig, "rft", args.params)
    if launch.relaunched("steps.rft", cfg.launcher, argv, args.params, "rft"):
        return
    base = cfg.base_model or read_json(args.models)["student_base"]
    examples = read_validated(args.data, EXAMPLES)
    kept = read_validated(args.kept, JUDGED)
    from transformers import AutoTokenizer
    rows = sft_rows(examples, kept, AutoTokenizer.from_pretrained(base), cfg.chat_template_kwargs)
    out = Path(args.out)
    training.finish_stage("rft", cfg, base, out, train_sft(cfg, rows, base, out))


if __name__ == "__main__":
    main()
