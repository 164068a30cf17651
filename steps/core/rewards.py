"""Reward functions, registered by name and weighted in params.

A reward is a pure function `reward(completions, **columns) -> list[float | None]` in TRL's
calling convention: `completions` are the decoded completions, `columns` the dataset columns
(one list entry per completion) plus `completion_ids`. GRPO and evaluation use the same
functions, so a number in a report and a number in training mean the same thing.

LiveThinking's composite reward is  r = w_c * C + w_h * H + w_l * r_length  with
    L_upper = lambda_upper * L_ref,  L_lower = lambda_lower * L_ref
    d = max(L_lower - L, 0) if L < L_lower;  max(L - L_upper, 0) if L > L_upper;  else 0
    r_length = max(0, 1 - d / epsilon)
where L_ref is the RFT model's output length for the prompt (column `ref_length`) and epsilon
is given as a fraction of L_ref (`epsilon_frac`) so that one value suits short and long prompts.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from steps.core.judges import Judge, make_judge
from steps.core.prompts import split_completion

RewardFn = Callable[..., list[float | None]]
EXAMPLE_COLUMNS = ("id", "dataset", "documents", "history", "question", "answers",
                   "gold_doc_idxs", "helpful_doc_idxs", "bridge")


def length_reward(length: float, ref_length: float, lambda_lower: float, lambda_upper: float,
                  epsilon: float) -> float:
    """The paper's r_length: 1 inside [lambda_lower*L_ref, lambda_upper*L_ref], falling linearly
    to 0 at epsilon tokens outside the band."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    lower, upper = lambda_lower * ref_length, lambda_upper * ref_length
    if length < lower:
        d = lower - length
    elif length > upper:
        d = length - upper
    else:
        d = 0.0
    return max(0.0, 1.0 - d / epsilon)


def composite_reward(correct: float, helpful: float, r_length: float, w_c: float, w_h: float,
                     w_l: float) -> float:
    return w_c * correct + w_h * helpful + w_l * r_length


def _examples(n: int, columns: dict[str, Any]) -> list[dict[str, Any]]:
    missing = [c for c in EXAMPLE_COLUMNS if c not in columns]
    if missing:
        raise KeyError(f"reward needs dataset columns {missing}")
    return [{c: columns[c][i] for c in EXAMPLE_COLUMNS} for i in range(n)]


def _verdicts(judge: Judge, completions: list[str], columns: dict[str, Any]):
    responses = [split_completion(c)[1] for c in completions]
    return judge.judge(_examples(len(completions), columns), responses)


def make_correctness(judge: str = "rule", **judge_options: Any) -> RewardFn:
    j = make_judge(judge, **judge_options)

    def correctness(completions: list[str], **columns: Any) -> list[float | None]:
        return [float(v.correct) for v in _verdicts(j, completions, columns)]
    return correctness


def make_helpfulness(judge: str = "rule", **judge_options: Any) -> RewardFn:
    j = make_judge(judge, **judge_options)

    def helpfulness(completions: list[str], **columns: Any) -> list[float | None]:
        return [float(v.helpful) for v in _verdicts(j, completions, columns)]
    return helpfulness


def make_length(lambda_lower: float = 0.0, lambda_upper: float = 0.5, epsilon_frac: float = 0.5) -> RewardFn:
    def length(completions: list[str], completion_ids: list[list[int]] | None = None,
               ref_length: list[float] | None = None, **_: Any) -> list[float | None]:
        if ref_length is None:
            raise KeyError("the length reward needs a `ref_length` column (the RFT model's output length)")
        lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else [len(c.split()) for c in completions]
        return [length_reward(n, ref, lambda_lower, lambda_upper, epsilon_frac * ref)
                for n, ref in zip(lengths, ref_length, strict=True)]
    return length


def make_grounding() -> RewardFn:
    """Grounded reasoning: the share of the thinking's content words found in the context
    (documents, history, question). Without it GRPO's length pressure can collapse the trace
    into a fixed string that no longer reads the documents; filler sentences score low too."""
    from steps.core.metrics import content_tokens, coverage

    def grounding(completions: list[str], **columns: Any) -> list[float | None]:
        out = []
        for c, ex in zip(completions, _examples(len(completions), columns), strict=True):
            thinking = split_completion(c)[0]
            context = set(content_tokens(" ".join(ex["documents"] + [t["content"] for t in ex["history"]]
                                                  + [ex["question"]])))
            out.append(coverage(thinking, context) if thinking else 0.0)
        return out
    return grounding


def make_format() -> RewardFn:
    """1 when the completion is `<think> ... </think> response` with a non-empty response."""
    def think_format(completions: list[str], **_: Any) -> list[float | None]:
        out = []
        for c in completions:
            ok = c.strip().startswith("<think>") and c.count("</think>") == 1 and c.count("<think>") == 1
            out.append(float(ok and bool(split_completion(c)[1])))
        return out
    return think_format


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "correctness": make_correctness,
    "helpfulness": make_helpfulness,
    "length": make_length,
    "format": make_format,
    "grounding": make_grounding,
}


def register(name: str, factory: Callable[..., RewardFn]) -> None:
    """Later methods (AdaptThink, Router-R1, RelayLLM) add their rewards here by name."""
    REWARDS[name] = factory


def make_rewards(spec: dict[str, dict[str, Any]]) -> tuple[list[RewardFn], list[float]]:
    """spec: {name: {weight: w, ...factory options}} -> (functions, weights) for GRPOTrainer."""
    fns, weights = [], []
    for name, opts in spec.items():
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
        opts = dict(opts)
        weights.append(float(opts.pop("weight", 1.0)))
        fn = REWARDS[name](**opts)
        fn.__name__ = name
        fns.append(fn)
    return fns, weights
