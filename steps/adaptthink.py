"""adaptthink: AdaptThink (arXiv 2505.13417, code THU-KEG/AdaptThink) from the RFT model — the
policy learns when to think.

1. **Reference pass**: `ref_samples` (K) thinking samples per training prompt from the starting
   policy, at the training temperature and budget; `ref_accuracy` = their mean accuracy (the
   reward's own `acc`: the judge's correctness, 0 when the think format fails). Written to
   ref_accuracy.jsonl with the think ratio and mean length of the samples, and per prompt its
   `hops` when the example has one. A prompt without a `ref_accuracy` stops the stage, named.
2. **Reward** (steps/core/rewards/hybrid.py): `acc - ref_accuracy + delta * forced_nothinking`,
   delta 0.05: NoThinking is preferred wherever it is no worse than the starting policy's
   thinking, by a margin of delta; the format rule is stated there (our template opens the
   thinking block in the completion).
3. **Importance sampling** (steps/core/rollouts/hybrid.py): of the K rollouts of a prompt, half
   are forced to NoThinking (`</think>` as the decision token, right after `<think>`), half to
   thinking (a fixed opener token there); the forced decision token's old log-prob is log 0.5
   for both halves, as in the reference; clipped ratio (epsilon 0.2); no KL; no group
   normalisation: the raw reward is the advantage (`advantage: raw`).

Where we depart, and why:
- The reference forces its model's most frequent thinking opener ("Alright" for R1-distilled
  Qwen). `thinking_opener: null` picks ours from the starting policy the same way: the token it
  most expects right after `<think>` (probabilities summed over up to 64 training prompts;
  `</think>` and special tokens excluded), i.e. the expected most frequent opener, which exists
  even for a policy whose samples seldom open a thinking; a string sets it.
- The reference's ratio is one per sequence, from the mean per-token log-ratio (only the
  forced token's old log-prob differs from the current one, so it moves by (log p - log 0.5)/L);
  TRL's `importance_sampling_level: sequence` computes exactly that, and is the default here.
- The reference gives the NoThinking half a shorter budget (4k of 16k tokens); both halves
  share `max_completion_length` here, which the embedded model's responses fit with room.
- Accuracy is the pipeline's judge (MuSiQue EM, e-commerce recall and grounding) where the
  reference checks a boxed math answer; K defaults to 4 (the paper's 16 is a param away) to
  keep the CPU default within its budget.

Input: rft/model, ingest/train.jsonl. Output: model/, ref_accuracy.jsonl, metrics.json,
train_log.csv.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from steps.core import launch
from steps.core.config import help_field, load_config
from steps.core.io import InputError
from steps.core.rl import RLConfig, finish_stage, prompt_rows, train_rl
from steps.core.schemas import EXAMPLES, read_validated

NOTHINKING_LOGP = math.log(0.5)


@dataclass(frozen=True)
class AdaptThinkConfig(RLConfig):
    rewards: dict = field(default_factory=lambda: {"adaptthink": {"weight": 1.0, "delta": 0.05}},
                          metadata={"help": "AdaptThink: adaptthink {delta, judge, think_opened_by}"})
    protocol: str = help_field("adaptthink", "the forced-halves rollout (steps/core/rollouts/hybrid.py)")
    advantage: Literal["group", "batch", "none", "raw"] = help_field("raw", "AdaptThink: no group normalisation")
    importance_sampling_level: Literal["token", "sequence"] = help_field("sequence", "the reference's ratio: one "
                                                                                     "per sequence")
    ref_samples: int = help_field(4, "K: thinking samples per prompt in the reference pass (paper: 16)", ge=1)
    nothinking_ratio: float = help_field(0.5, "share of each group forced to NoThinking", ge=0.0, le=1.0)
    thinking_opener: str | None = help_field(None, "the token forced to start a thinking (null: the most frequent "
                                                   "first thinking token of the reference pass)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if "adaptthink" not in self.rewards:
            raise ValueError("rewards: AdaptThink needs the adaptthink reward")
        if self.nothinking_ratio not in (0.0, 1.0) and round(self.num_generations * self.nothinking_ratio) in (
                0, self.num_generations):
            raise ValueError(f"num_generations={self.num_generations} leaves no rollout in one of the two halves "
                             f"at nothinking_ratio={self.nothinking_ratio}: raise num_generations")


def reward_options(cfg: AdaptThinkConfig) -> dict[str, Any]:
    return {k: v for k, v in (cfg.rewards["adaptthink"] or {}).items() if k not in ("weight", "delta")}


def reference_pass(policy: str, rows: list[dict[str, Any]], cfg: AdaptThinkConfig) -> list[dict[str, Any]]:
    """Per prompt: ref_accuracy over K thinking samples of the starting policy, with their think
    ratio and mean length."""
    from steps.core.backends import SamplingParams, TransformersBackend, derive_seed
    from steps.core.prompts import Prompt
    from steps.core.rewards.hybrid import accuracy, thinks

    backend = TransformersBackend(policy, batch_size=64, threads=cfg.threads)
    prompts = [Prompt(messages=(), text=r["prompt"], key=r["id"]) for r in rows]
    outs = backend.generate(prompts, SamplingParams(n=cfg.ref_samples, temperature=cfg.temperature,
                                                    max_new_tokens=cfg.max_completion_length,
                                                    seed=derive_seed(cfg.seed, "adaptthink", "reference")))
    ref = []
    for r, cs in zip(rows, outs, strict=True):
        texts = [c.text for c in cs]
        acc = accuracy(texts, {k: [v] * len(texts) for k, v in r.items()}, **reward_options(cfg))
        ref.append({"id": r["id"], "dataset": r["dataset"], "hops": r.get("hops"),
                    "ref_accuracy": sum(acc) / len(acc),
                    "ref_think_ratio": sum(thinks(t) for t in texts) / len(texts),
                    "ref_length": sum(c.completion_tokens for c in cs) / len(cs)})
    backend.close()
    return ref


def attach_ref_accuracy(rows: list[dict[str, Any]], ref: list[dict[str, Any]], source: str) -> list[dict[str, Any]]:
    """Each prompt row with its ref_accuracy; a prompt without one stops the stage, named."""
    by_id = {r["id"]: r.get("ref_accuracy") for r in ref}
    out = []
    for r in rows:
        value = by_id.get(r["id"])
        if value is None or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise InputError(f"{source}: prompt {r['id']!r} has no ref_accuracy (got {value!r}); the reference pass "
                             "must cover every training prompt")
        out.append({**r, "ref_accuracy": float(value)})
    return out


def choose_opener(cfg: AdaptThinkConfig, policy: str, prompts: list[str], limit: int = 64) -> int:
    """The token forced to start a thinking: the configured one, or the one the starting policy
    most expects right after `<think>` (module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.core.rollouts.hybrid import marker_ids, opened_by_prompt

    tok = AutoTokenizer.from_pretrained(policy)
    if cfg.thinking_opener is not None:
        ids = tok(cfg.thinking_opener, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"adaptthink.thinking_opener {cfg.thinking_opener!r} is {len(ids)} tokens; it must be one")
        return ids[0]
    open_id, close_id = marker_ids(tok)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    mass = None
    with torch.no_grad():
        for text in prompts[:limit]:
            ids = tok(text, add_special_tokens=False)["input_ids"] + ([] if opened_by_prompt(text) else [open_id])
            p = torch.softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)  # (V,)
            mass = p if mass is None else mass + p
    if mass is None:
        raise ValueError("no training prompt to choose the thinking opener from")
    for t in (open_id, close_id, *tok.all_special_ids):
        if t < mass.numel():
            mass[t] = -1.0
    return int(mass.argmax())


def decision_positions(ids: Any, open_id: int) -> Any:
    """(B,) index of each completion's decision token: the second when the completion starts
    with `<think>`, else the first (an R1-style template opened the block)."""
    return (ids[:, 0] == open_id).long()


def make_old_logp_override(open_id: int, logp: float = NOTHINKING_LOGP, close_id: int | None = None):
    """The old log-prob of every rollout's forced decision token set to log 0.5 (both halves were
    forced with probability 0.5). With `close_id`, its `stats` (steps/core/rl.py) log what the
    forcing hides: the policy's own probability of NoThinking, p(`</think>` right after `<think>`),
    read from the NoThinking half's decision token before the override, overall
    (`rollout/p_nothinking`) and per hop count of the prompt (`rollout/p_nothinking_hops_<h>`).
    1 - p is the think ratio the policy would have at the training temperature; the forced
    rollouts themselves always show half and half."""
    def override(batch: dict[str, Any]) -> Any:
        import torch

        ids = batch["completion_ids"]  # (B, T)
        forced = torch.full(ids.shape, float("nan"))
        forced[torch.arange(ids.size(0)), decision_positions(ids, open_id)] = logp
        return forced.to(ids.device)

    def stats(inputs: list[dict[str, Any]], batch: dict[str, Any], own_logps: Any) -> dict[str, float]:
        import torch

        ids = batch["completion_ids"]
        rows = torch.arange(ids.size(0), device=ids.device)
        pos = decision_positions(ids, open_id)
        nothinking = ids[rows, pos] == close_id
        p = own_logps[rows, pos].exp().float()
        if not bool(nothinking.any()):
            return {}
        out = {"rollout/p_nothinking": float(p[nothinking].mean())}
        if len(inputs) == ids.size(0):  # hops of each completion's prompt, where the rows have them
            by_hops: dict[Any, list[float]] = {}
            for i in nothinking.nonzero().flatten().tolist():
                if inputs[i].get("hops") is not None:
                    by_hops.setdefault(inputs[i]["hops"], []).append(float(p[i]))
            out.update({f"rollout/p_nothinking_hops_{h}": sum(v) / len(v) for h, v in sorted(by_hops.items())})
        return out

    if close_id is not None:
        override.stats = stats  # type: ignore[attr-defined]
    return override


def train_adaptthink(cfg: AdaptThinkConfig, rows: list[dict[str, Any]], policy: str, out: Path,
                     opener_id: int) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from steps.core.rollouts.hybrid import marker_ids

    open_id, close_id = marker_ids(AutoTokenizer.from_pretrained(policy))
    run_cfg = replace(cfg, protocol_options={**cfg.protocol_options, "thinking_opener_id": opener_id,
                                             "nothinking_ratio": cfg.nothinking_ratio})
    return train_rl(run_cfg, rows, policy, out, old_logp_override=make_old_logp_override(open_id, close_id=close_id))


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    from steps.core.io import write_jsonl

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--out", default="data/adaptthink")
    args = ap.parse_args(argv)
    cfg = load_config(AdaptThinkConfig, "adaptthink", args.params)
    if launch.relaunched("steps.adaptthink", cfg.launcher, argv, args.params, "adaptthink"):
        return
    out = Path(args.out)
    rows = prompt_rows(cfg, read_validated(args.data, EXAMPLES), args.rft)
    ref = reference_pass(args.rft, rows, cfg)
    write_jsonl(out / "ref_accuracy.jsonl", ref)
    rows = attach_ref_accuracy(rows, ref, str(out / "ref_accuracy.jsonl"))
    tokenizer = AutoTokenizer.from_pretrained(args.rft)
    opener_id = choose_opener(cfg, args.rft, [r["prompt"] for r in rows])
    result = train_adaptthink(cfg, rows, args.rft, out, opener_id)
    result["metrics"].update({
        "mean_ref_accuracy": sum(r["ref_accuracy"] for r in ref) / len(ref),
        "ref_think_ratio": sum(r["ref_think_ratio"] for r in ref) / len(ref),
        "thinking_opener": tokenizer.convert_ids_to_tokens(opener_id)})
    finish_stage("adaptthink", cfg, args.rft, out, result)


if __name__ == "__main__":
    main()
