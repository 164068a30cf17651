"""DLER's reward (arXiv 2510.15110): the plain truncation penalty.

A response longer than the target length earns 0; one within it earns its correctness. DLER's
point is that this simplest of length penalties cuts reasoning length by far without losing
accuracy once the optimisation is fixed (batch-level advantage normalisation, a higher upper clip,
dynamic sampling: steps/dler.py). DLER truncates the rollout at the target, so an over-long
response is cut and scores 0; scoring a completed response 0 when it is over the target gives
the same reward without wasting the tail of the budget on text that cannot count.

Columns: the judge's example columns (as correctness), `policy_tokens` or `completion_ids`.
"""
from __future__ import annotations

from typing import Any

from steps.core.rewards import RewardFn
from steps.core.rewards.livethinking import make_correctness, policy_lengths


def make_truncated_correctness(max_tokens: int = 48, judge: str = "rule", **judge_options: Any) -> RewardFn:
    if max_tokens < 1:
        raise ValueError(f"truncated_correctness needs max_tokens >= 1, got {max_tokens}")
    correctness = make_correctness(judge, **judge_options)

    def truncated_correctness(completions: list[str], completion_ids: list[list[int]] | None = None,
                              policy_tokens: list[int] | None = None, **columns: Any) -> list[float | None]:
        lengths = policy_lengths(completions, completion_ids, policy_tokens)
        scores = correctness(completions, **columns)
        return [0.0 if n > max_tokens else s for n, s in zip(lengths, scores, strict=True)]
    return truncated_correctness


REWARDS = {"truncated_correctness": make_truncated_correctness}
