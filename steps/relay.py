"""relay: RelayLLM (arXiv 2601.05167): the student calls the teacher for n tokens at the hard moments.

From the RFT model and the pipeline's teacher, three steps:
1. **Data filter**: the teacher answers each training prompt `filter_samples` times (m = 10 in
   the paper); prompts whose teacher pass rate (the judge's correctness) is below
   `filter_min_pass_rate` (50 %) are dropped: a call can only help where the teacher can.
2. **Warm-up SFT**: the student's own samples on the kept prompts (the correct ones; `all` for
   presets whose untrained models solve nothing), each with 0 to `warmup_max_commands` commands
   `<call>n</call>` inserted at random token positions, n uniform in `warmup_call_tokens`: the
   student learns the syntax before RL. When the student's tokenizer cannot spell the command
   tags (the embedded word-level vocabulary), `<call>` and `</call>` are added to it as two
   ordinary tokens (not special: rewards and the rollout must see them in decoded text) and the
   embeddings are resized; the teacher's vocabulary is left as it is.
3. **GRPO** with relay decoding (steps/core/rollouts/relay.py: the teacher's tokens masked out
   of the loss) and the difficulty-aware reward (steps/core/rewards/relay.py), group of 8, KL
   0.01 (`beta`) as in the paper, on the shared RL trainer (steps/core/rl.py).

Where we depart from the paper: its learning rate (1e-6) is for a 1.7B model; the embedded
default's tiny models use the pipeline's RL rate. The data filter is judged by the pipeline's
judge, not the paper's math grader.

Input: rft/model, the teacher (pretrain_demo/models.json, or `teacher`), ingest/train.jsonl.
Output: model/ (the RelayLLM student), warmup/model (after the warm-up SFT), filter.jsonl
(pass rate per prompt), metrics.json, train_log.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steps.core import launch
from steps.core.config import help_field, load_config
from steps.core.rl import RLConfig, finish_stage, train_rl
from steps.core.schemas import EXAMPLES, read_validated

COMMAND_TAGS = ("<call>", "</call>")


@dataclass(frozen=True)
class RelayConfig(RLConfig):
    rewards: dict = field(default_factory=lambda: {"relay_difficulty": {"weight": 1.0, "judge": "rule"}},
                          metadata={"help": "reward name -> {weight, options}; RelayLLM: relay_difficulty"})
    protocol: str = help_field("relay", "the relay rollout (steps/core/rollouts/relay.py)")
    beta: float = help_field(0.01, "KL coefficient (the paper: 0.01)", ge=0.0)
    teacher: str | None = help_field(None, "teacher model; default: pretrain_demo/models.json teacher")
    teacher_backend: str = help_field("transformers", "the teacher's back end: transformers | vllm | openai")
    teacher_options: dict = field(default_factory=dict, metadata={"help": "passed to the teacher's back end"})
    max_calls: int = help_field(3, "calls per response (the paper: 3)", ge=0)
    max_call_tokens: int = help_field(32, "cap on each call's n", ge=1)
    judge: str = help_field("rule", "judge of the filter and the warm-up samples (as in the judge stage)")
    sample_max_new_tokens: int = help_field(160, "budget of the filter's and the warm-up's samples", ge=1)
    sample_temperature: float = help_field(1.0, "temperature of the filter's and the warm-up's samples", ge=0.0)
    filter_samples: int = help_field(10, "m: teacher samples per prompt (the paper: 10)", ge=1)
    filter_min_pass_rate: float = help_field(0.5, "keep prompts whose teacher pass rate is at least this",
                                             ge=0.0, le=1.0)
    warmup_samples: int = help_field(4, "student samples per kept prompt for the warm-up SFT", ge=1)
    warmup_keep: Literal["correct", "all"] = help_field("correct", "which student samples the warm-up trains on")
    warmup_max_commands: int = help_field(3, "commands inserted per sample: 0 to this many (the paper: 3)", ge=0)
    warmup_call_tokens: tuple[int, int] = help_field((1, 16), "[lo, hi]: the inserted commands' n")
    warmup_steps: int = help_field(60, "warm-up SFT optimiser steps", ge=1)
    warmup_learning_rate: float = help_field(1e-3, "warm-up SFT peak learning rate", gt=0.0)
    warmup_batch_size: int = help_field(16, "warm-up SFT batch size", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        lo, hi = self.warmup_call_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"warmup_call_tokens: expected [lo, hi] with 1 <= lo <= hi, got {list(self.warmup_call_tokens)}")

    def teacher_spec(self, teacher: str) -> dict[str, Any]:
        return {"backend": self.teacher_backend, "model": teacher, **self.teacher_options}


def insert_commands(ids: list[int], command_ids: Any, rng: random.Random, max_commands: int,
                    call_tokens: tuple[int, int]) -> list[int]:
    """`ids` with 0..max_commands commands (command_ids(n) -> their token ids) at random token
    positions, n uniform in call_tokens; the sample's own tokens keep their order."""
    k = rng.randint(0, max_commands)
    cuts = sorted(rng.randint(0, len(ids)) for _ in range(k))
    out, prev = [], 0
    for c in cuts:
        out += ids[prev:c] + list(command_ids(rng.randint(*call_tokens)))
        prev = c
    return out + ids[prev:]


def add_command_tokens(model_dir: str, out: Path, seed: int) -> tuple[str, bool]:
    """The student with a tokenizer that spells the command tags (added when it cannot), saved
    under `out`; (its directory, whether tokens were added)."""
    from transformers import AutoTokenizer

    from steps.core.vocab import add_vocabulary

    tok = AutoTokenizer.from_pretrained(model_dir)
    unk = tok.unk_token_id
    if unk is None or all(unk not in tok(t, add_special_tokens=False)["input_ids"] for t in COMMAND_TAGS):
        return model_dir, False
    return add_vocabulary(model_dir, out, list(COMMAND_TAGS), seed), True


def _samples(backend: Any, examples: list[dict[str, Any]], k: int, cfg: RelayConfig, stage_key: str) -> list[list[str]]:
    from steps.core import prompts as P
    from steps.core.backends import SamplingParams, derive_seed

    prompts = [P.build(e, backend.tokenizer, cfg.chat_template_kwargs) for e in examples]
    sampling = SamplingParams(n=k, temperature=cfg.sample_temperature, max_new_tokens=cfg.sample_max_new_tokens,
                              seed=derive_seed(cfg.seed, "relay", stage_key))
    return [[c.text for c in cs] for cs in backend.generate(prompts, sampling)]


def data_filter(cfg: RelayConfig, examples: list[dict[str, Any]], teacher: Any) -> tuple[list[dict[str, Any]], list[dict]]:
    """(kept examples, one row per example with the teacher's pass rate)."""
    from steps.core import prompts as P
    from steps.core.judges import make_judge

    judge = make_judge(cfg.judge)
    texts = _samples(teacher, examples, cfg.filter_samples, cfg, "filter")
    rows, kept = [], []
    for e, outs in zip(examples, texts, strict=True):
        verdicts = judge.judge([e] * len(outs), [P.split_completion(t)[1] for t in outs])
        rate = statistics.fmean(v.correct for v in verdicts)
        rows.append({"id": e["id"], "dataset": e["dataset"], "teacher_pass_rate": rate,
                     "kept": rate >= cfg.filter_min_pass_rate})
        if rate >= cfg.filter_min_pass_rate:
            kept.append(e)
    return kept, rows


def warmup_rows(cfg: RelayConfig, examples: list[dict[str, Any]], student: Any) -> list[dict[str, str]]:
    """SFT rows: the student's own samples (correct ones, or all) with commands inserted."""
    from steps.core import prompts as P
    from steps.core.backends import derive_seed
    from steps.core.judges import make_judge

    judge = make_judge(cfg.judge)
    tok = student.tokenizer
    texts = _samples(student, examples, cfg.warmup_samples, cfg, "warmup")
    rows = []
    for e, outs in zip(examples, texts, strict=True):
        prompt = P.render(e, tok, cfg.chat_template_kwargs).text
        verdicts = judge.judge([e] * len(outs), [P.split_completion(t)[1] for t in outs])
        for j, (text, v) in enumerate(zip(outs, verdicts, strict=True)):
            if cfg.warmup_keep == "correct" and not v.correct:
                continue
            rng = random.Random(derive_seed(cfg.seed, "relay-warmup", e["id"], j))
            ids = insert_commands(tok(text, add_special_tokens=False)["input_ids"],
                                  lambda n: tok(f"<call> {n} </call>", add_special_tokens=False)["input_ids"],
                                  rng, cfg.warmup_max_commands, cfg.warmup_call_tokens)
            rows.append({"prompt": prompt, "completion": tok.decode(ids, skip_special_tokens=True)})
    return rows


def train_relay(cfg: RelayConfig, examples: list[dict[str, Any]], rft: str, teacher: str, out: Path) -> dict[str, Any]:
    from steps.core import training
    from steps.core.backends import TransformersBackend
    from steps.core.io import write_jsonl
    from steps.core.rollouts.relay import teacher_backend
    from steps.rft import RftConfig, train_sft

    spec = cfg.teacher_spec(teacher)
    examples = examples[: cfg.max_prompts]
    kept, filter_log = data_filter(cfg, examples, teacher_backend(spec))
    write_jsonl(out / "filter.jsonl", filter_log)
    if not kept:
        raise ValueError(f"relay: no training prompt has a teacher pass rate >= {cfg.filter_min_pass_rate} over "
                         f"{cfg.filter_samples} samples; lower relay.filter_min_pass_rate")
    base, added = add_command_tokens(rft, out / "warmup_base", cfg.seed)
    rows = warmup_rows(cfg, kept, TransformersBackend(base, threads=cfg.threads))
    sft = RftConfig(max_steps=cfg.warmup_steps, learning_rate=cfg.warmup_learning_rate, batch_size=cfg.warmup_batch_size,
                    lambda_aux=cfg.lambda_aux, bf16=cfg.bf16, threads=cfg.threads,
                    chat_template_kwargs=cfg.chat_template_kwargs, seed=cfg.seed)
    warm = train_sft(sft, rows, base, out / "warmup", stage_name="relay warm-up")
    policy = str(out / "warmup" / "model")
    from transformers import AutoTokenizer
    rl_cfg = dataclasses.replace(cfg, protocol_options={"teacher": spec, "max_calls": cfg.max_calls,
                                                        "max_call_tokens": cfg.max_call_tokens,
                                                        **cfg.protocol_options})
    result = train_rl(rl_cfg, training.prompt_rows(kept, AutoTokenizer.from_pretrained(policy), cfg.chat_template_kwargs),
                      policy, out)
    result["metrics"].update({
        "filter_prompts": len(examples), "filter_kept": len(kept),
        "filter_mean_pass_rate": statistics.fmean(r["teacher_pass_rate"] for r in filter_log),
        "warmup_rows": len(rows), "warmup_final_loss": warm["metrics"]["final_loss"],
        "command_tokens_added": added})
    return result


def main(argv: list[str] | None = None) -> None:
    from steps.core.io import read_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--models", default="data/pretrain_demo/models.json")
    ap.add_argument("--out", default="data/relay")
    args = ap.parse_args(argv)
    cfg = load_config(RelayConfig, "relay", args.params)
    if launch.relaunched("steps.relay", cfg.launcher, argv, args.params, "relay"):
        return
    teacher = cfg.teacher or read_json(args.models)["teacher"]
    out = Path(args.out)
    result = train_relay(cfg, read_validated(args.data, EXAMPLES), args.rft, teacher, out)
    finish_stage("relay", cfg, args.rft, out, result)


if __name__ == "__main__":
    main()
