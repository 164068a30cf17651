"""fusion: thinking-mode fusion (Qwen3's stage 3) — one student that thinks or not on request.

An RFT variant whose kept set mixes the two modes:
- the judge-kept thinking traces of the main job (judge/kept.jsonl, as RFT trains on), each with
  its prompt rendered in thinking mode;
- judge-kept no-think responses: the teacher sampled here with `enable_thinking: false` (the
  chat template pre-fills the empty `<think> </think>`, so the teacher writes the response
  only), judged by the same judge and filter, and trained with the same no-think prompt.
The student base is fine-tuned on both (steps/rft.py's trainer: L_SFT + lambda_aux * L_aux), so
that the switch a user sets — `enable_thinking`, or `/think` and `/no_think` in the user turn,
which our template honours as Qwen3's does — selects the mode. Evaluated twice: as it decides
(`rft_fused`, protocol plain) and asked not to think (`rft_fused_no_think`, protocol no_think).

Where we depart: Qwen3 fuses on top of its reasoning-RL model and samples the no-think data from
its own earlier stages; ours fuses from the student base, as RFT does, so that the fused model
and the thinking-only RFT model differ in their data only.

Input: ingest/train.jsonl, judge/kept.jsonl, pretrain_demo/models.json (teacher, student base).
Output: model/, kept_no_think.jsonl, metrics.json, train_log.csv.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core.config import ConfigError, build, help_field, load_config

NO_THINK = {"enable_thinking": False}


@dataclass(frozen=True)
class FusionConfig:
    sample: dict = field(default_factory=dict, metadata={
        "help": "the teacher's no-think sampling: options of the sample stage (k, temperature, backend, ...); "
                "enable_thinking false is set here"})
    judge: dict = field(default_factory=dict, metadata={"help": "options of the judge stage (kind, keep, ...)"})
    train: dict = field(default_factory=dict, metadata={"help": "options of the rft stage (max_steps, "
                                                                "learning_rate, batch_size, ...)"})
    seed: int = help_field(0, "null: base.seed", ge=0)

    def __post_init__(self) -> None:
        self.sample_config()
        self.judge_config()
        self.train_config()

    def sample_config(self) -> Any:
        from steps.sample import SampleConfig

        if "chat_template_kwargs" in self.sample:
            raise ConfigError("sample.chat_template_kwargs: set by the stage (no-think sampling)")
        return build(SampleConfig, {**self.sample, "chat_template_kwargs": NO_THINK, "seed": self.seed}, "sample")

    def judge_config(self) -> Any:
        from steps.judge import JudgeConfig

        return build(JudgeConfig, dict(self.judge), "judge")

    def train_config(self) -> Any:
        from steps.rft import RftConfig

        if "chat_template_kwargs" in self.train:
            raise ConfigError("train.chat_template_kwargs: set by the stage (each mode renders its own prompts)")
        if self.train.get("launcher"):
            raise ConfigError("train.launcher: the fusion stage trains in one process (it samples the teacher "
                              "first); the rft stage and the RL stages take a launcher")
        return build(RftConfig, {**self.train, "seed": self.seed}, "train")


def fused_rows(examples: list[dict[str, Any]], kept_think: list[dict[str, Any]], kept_no_think: list[dict[str, Any]],
               tokenizer: Any) -> list[dict[str, str]]:
    """SFT rows of both modes: thinking traces under thinking prompts, no-think responses (the
    response only) under prompts that pre-fill the empty thinking block."""
    from steps.rft import sft_rows

    no_think = [{**k, "completion": k["response"]} for k in kept_no_think]
    return sft_rows(examples, kept_think, tokenizer, {}) + sft_rows(examples, no_think, tokenizer, NO_THINK)


def sample_and_judge(cfg: FusionConfig, examples: list[dict[str, Any]], teacher: str,
                     work: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The teacher's no-think candidates, judged; -> (kept rows, judge stats)."""
    from steps.judge import judge
    from steps.sample import sample

    candidates, _ = sample(cfg.sample_config(), examples, teacher, work)
    _, kept, stats = judge(cfg.judge_config(), examples, candidates)
    return kept, stats


def main(argv: list[str] | None = None) -> None:
    import shutil

    from transformers import AutoTokenizer

    from steps.core.io import read_json, write_jsonl
    from steps.core.schemas import EXAMPLES, JUDGED, read_validated
    from steps.core.training import finish_stage
    from steps.rft import train_sft

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--kept", default="data/judge/kept.jsonl")
    ap.add_argument("--models", default="data/pretrain_demo/models.json")
    ap.add_argument("--out", default="data/fusion")
    args = ap.parse_args(argv)
    cfg = load_config(FusionConfig, "fusion", args.params)
    train_cfg = cfg.train_config()
    models = read_json(args.models)
    base = train_cfg.base_model or models["student_base"]
    examples = read_validated(args.data, EXAMPLES)
    kept_think = read_validated(args.kept, JUDGED)
    out = Path(args.out)
    from steps.sample import resume_key

    teacher = cfg.sample_config().model or models["teacher"]
    work = out / ".resume" / resume_key(cfg.sample_config(), teacher, args.data)
    kept_no_think, judge_stats = sample_and_judge(cfg, examples, teacher, work)
    write_jsonl(out / "kept_no_think.jsonl", kept_no_think)
    rows = fused_rows(examples, kept_think, kept_no_think, AutoTokenizer.from_pretrained(base))
    result = train_sft(train_cfg, rows, base, out, stage_name="fusion")
    result["metrics"].update({"thinking_rows": len(kept_think), "no_think_rows": len(kept_no_think),
                              "no_think_judge": judge_stats})
    finish_stage("fusion", cfg, base, out, result)
    shutil.rmtree(out / ".resume", ignore_errors=True)
    print(f"fusion: {len(kept_think)} thinking + {len(kept_no_think)} no-think rows; {result['metrics']['steps']} steps")


if __name__ == "__main__":
    main()
