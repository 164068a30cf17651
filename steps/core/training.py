"""What the RFT and GRPO stages share: TRL arguments that work on CPU and GPU alike, the
dataset rows the trainers read, and the training log as plain rows."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steps.core import prompts as P


def common_args(output_dir: Path, *, seed: int, learning_rate: float, batch_size: int, max_steps: int,
                epochs: float, warmup_ratio: float, logging_steps: int, bf16: bool | None,
                batch_key: str = "batch_size", save_steps: int = 0) -> dict[str, Any]:
    """TrainingArguments shared by SFTConfig and GRPOConfig (a float warmup_steps < 1 is a ratio). On CPU bf16 and gradient
    checkpointing are off (TRL's defaults assume a GPU); checkpoints are not written mid-run
    because the stage's output is the final model, unless `save_steps` asks for the weights every
    so many steps (model only: they are for evaluating the run's course, not for resuming it).
    `batch_size` is global (sequences per optimiser step), split over the processes of a launched
    run (steps.core.launch); `batch_key` names it in params for the error when it does not split."""
    import torch

    from steps.core.launch import per_device_batch

    cuda = torch.cuda.is_available()
    args = dict(output_dir=str(output_dir), seed=seed, data_seed=seed, learning_rate=learning_rate,
                per_device_train_batch_size=per_device_batch(batch_size, batch_key), max_steps=max_steps,
                num_train_epochs=epochs,
                warmup_steps=warmup_ratio, lr_scheduler_type="cosine", logging_steps=logging_steps,
                save_strategy="no", report_to=[], bf16=cuda if bf16 is None else bf16,
                gradient_checkpointing=False, use_cpu=not cuda, dataloader_num_workers=0,
                disable_tqdm=False, logging_first_step=True)
    if save_steps:
        args.update(save_strategy="steps", save_steps=save_steps, save_only_model=True)
    return args


def prompt_rows(examples: list[dict[str, Any]], tokenizer: Any,
                chat_template_kwargs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Example rows plus the rendered `prompt` string (TRL's standard, non-conversational form:
    the chat template is applied here, identically for every model)."""
    return [{**e, "prompt": P.render(e, tokenizer, chat_template_kwargs).text} for e in examples]


def history_rows(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trainer.state.log_history -> rows with `step` and numeric values only."""
    rows = []
    for entry in log_history:
        row = {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k != "step"}
        if row:
            rows.append({"step": int(entry.get("step", 0)), **row})
    return rows


def set_threads(threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def generation_mode(model: Any) -> Iterator[Any]:
    """Decode with a model that is being trained: eval mode, the KV cache on and the MoE router
    loss off while generating (it fails on cached, padded generation), all put back after."""
    was_training = model.training
    saved = {k: getattr(model.config, k) for k in ("use_cache", "output_router_logits") if hasattr(model.config, k)}
    model.config.use_cache = True
    if "output_router_logits" in saved:
        model.config.output_router_logits = False
    model.eval()
    try:
        yield model
    finally:
        for k, v in saved.items():
            setattr(model.config, k, v)
        model.train(was_training)


def finish_stage(stage: str, cfg: Any, parent: str, out: Path, result: dict[str, Any]) -> None:
    """What every training stage writes after training `out/model` from `parent`: the FLOPs
    profile and meta.json beside the model, metrics.json, train_log.csv, and the MLflow run; in a
    launched run the main process alone (steps/core/launch.py)."""
    from steps.core import launch

    if not launch.is_main():
        return
    from transformers import AutoModelForCausalLM

    from steps.core import modeling, tracking
    from steps.core.io import write_json, write_train_log
    from steps.core.lineage import write_meta

    try:  # under DeepSpeed ZeRO-3 the trainer leaves transformers partitioning every model it builds
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
    except ImportError:  # pragma: no cover - transformers without its DeepSpeed integration
        pass
    else:  # over all processes; this load is the main process's alone (the others have returned)
        unset_hf_deepspeed_config()
    modeling.save_profile(AutoModelForCausalLM.from_pretrained(out / "model"), out / "model")
    write_meta(out / "model", stage, cfg, parent=parent, metrics=result["metrics"])
    write_json(out / "metrics.json", result["metrics"])
    write_train_log(out / "train_log.csv", result["history"])
    tracking.log_stage(stage, cfg, history=result["history"],
                       metrics={k: v for k, v in result["metrics"].items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    print(f"{stage}: {result['metrics']}")
