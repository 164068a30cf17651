"""Router-R1's rewards (arXiv 2506.09033): format, outcome and cost, and their combination.

A routed response (steps/core/rollouts/router.py) reads

    <think> ... </think> <search> teacher : who was born in dadada ? </search>
    <information> ... </information> <think> ... </think> <answer> kestria </answer>

- **format** (`router_format`): 0, or -1 when any rule breaks (`format_violation` names the first):
  no tag block at all; a tag opened and closed a different number of times (unbalanced); a
  block holding another tag (nested); a think block empty or "..."; not exactly one answer; no
  think block; searches != informations; the response does not start with `<think>` or does
  not end with `</answer>`; a search that is not `name : query` with one colon, an empty query
  or a placeholder (the prompt's `name` / `query`, the reference's `llm-name` / `your-query`,
  or a query that repeats the member's name: a copied descriptor); a member name not in the pool.
- **outcome** (`router_outcome`): EM or token F1 (`metric`) of the last answer block against the
  gold `answers`, with the official MuSiQue normalisation (steps.core.metrics); an answer block
  written as "the answer is X" is read as X, as the pipeline's own responses are.
- **cost** (`router_cost`): the response's price (column `cost`: Σ member tokens x price per
  million / 1e6, from the rollout), square-rooted, then min-max scaled between the 5th and 95th
  percentiles (linear interpolation) of the last `window` values, the current one included,
  clipped to [0, 1] and flipped, so that the cheapest response scores 1 (0.5 while the window
  has no spread).
- **router_r1**: with format f, outcome s and scaled cost c,
  `(s + f)(1 - alpha) + c * alpha` when the answer is right (s > 0), else `f`; -1 whenever the
  format breaks, as the reference returns the penalty alone. alpha = 0 ignores the price.

The rolling window is state. One window lives in each reward function that `make_rewards`
builds, i.e. one per training run (steps.core.rl builds the rewards once per `train_rl`); values
enter in the order TRL scores completions (one call per generation batch, batch order), as the
reference's module-level deque does per training process. It is not checkpointed (the RL stages
never resume mid-run) and each process of a multi-process run keeps its own. The command line
(`python -m steps.core.rewards score`) builds a fresh window and feeds it the rows in file order.

Where we depart from the reference (ulab-uiuc/Router-R1, verl/trainer/main_ppo.py and
verl/utils/reward_score/qa_em.py): its F1 scores a yes/no/noanswer mismatch 0 by a special rule
(HotpotQA's script); we use the official MuSiQue F1, the pipeline's one scorer.
"""
from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

from steps.core.metrics import exact_match, extract_answer, max_over, normalize_answer, token_f1
from steps.core.rewards import RewardFn

TAGS = ("think", "search", "information", "answer")
EMBEDDED_POOL = ("teacher", "student_base", "rft")
_BLOCK = re.compile(r"<(think|search|information|answer)>(.*?)</\1>", re.S)
_ANY_TAG = re.compile(r"</?(?:think|search|information|answer)>")
PLACEHOLDER_NAMES = frozenset({"name", "llm-name", "member"})
PLACEHOLDER_QUERIES = frozenset({"query", "your-query", "your query", "..."})


def parse_search(content: str) -> tuple[str, str] | None:
    """`name : query` -> (name, query), both stripped; None unless there is exactly one colon."""
    if content.count(":") != 1:
        return None
    name, query = content.split(":")
    return name.strip().lower(), query.strip()


def bad_query(name: str, query: str) -> bool:
    """Empty, a placeholder, or repeating the member's name (a copied descriptor)."""
    q = query.strip().lower()
    if not q or q in PLACEHOLDER_QUERIES or name in PLACEHOLDER_NAMES:
        return True
    if "llm-name" in q or "your-query" in q:
        return True
    return f" {normalize_answer(name)} " in f" {normalize_answer(q)} "


def format_violation(text: str, members: Sequence[str]) -> str | None:
    """The first format rule `text` breaks (module docstring), or None."""
    blocks = _BLOCK.findall(text)
    if not blocks:
        return "no blocks"
    if any(text.count(f"<{t}>") != text.count(f"</{t}>") for t in TAGS):
        return "unbalanced"
    if any(_ANY_TAG.search(content) for _, content in blocks):
        return "nested"
    kinds = [kind for kind, _ in blocks]
    if any(kind == "think" and content.strip() in ("", "...") for kind, content in blocks):
        return "empty think"
    if kinds.count("answer") != 1:
        return "answer count"
    if "think" not in kinds:
        return "no think"
    if kinds.count("search") != kinds.count("information"):
        return "searches != informations"
    stripped = text.strip()
    if not stripped.startswith("<think>"):
        return "start"
    if not stripped.endswith("</answer>"):
        return "end"
    known = {m.lower() for m in members}
    searches = [parse_search(content) for kind, content in blocks if kind == "search"]
    if any(s is None or bad_query(*s) for s in searches):
        return "query"
    if any(name not in known for name, _ in searches):
        return "unknown member"
    return None


def format_score(text: str, members: Sequence[str]) -> float:
    return -1.0 if format_violation(text, members) else 0.0


def final_answer(text: str) -> str | None:
    """The last answer block's content ("the answer is X" read as X); None without one."""
    found = [content for kind, content in _BLOCK.findall(text) if kind == "answer"]
    if not found:
        return None
    answer = found[-1].strip()
    return extract_answer(answer) if "answer is" in answer.lower() else answer


def outcome_score(text: str, answers: Sequence[str], metric: str = "em") -> float:
    answer = final_answer(text)
    if answer is None:
        return 0.0
    return max_over(exact_match if metric == "em" else token_f1, answer, list(answers))


class RollingCostScale:
    """sqrt(cost), scaled between the q_low and q_high percentiles of the last `window` values
    (the current one included), clipped and flipped: cheaper is higher."""

    def __init__(self, window: int = 1000, q_low: float = 0.05, q_high: float = 0.95, eps: float = 1e-8):
        if window < 1 or not 0.0 <= q_low < q_high <= 1.0:
            raise ValueError(f"cost scale: need window >= 1 and 0 <= q_low < q_high <= 1, got {window}, {q_low}, {q_high}")
        self.values: deque[float] = deque(maxlen=window)
        self.q_low, self.q_high, self.eps = q_low, q_high, eps

    def __call__(self, cost: float) -> float:
        import numpy as np

        if cost is None or not math.isfinite(float(cost)) or cost < 0:
            raise ValueError(f"cost must be a finite number >= 0, got {cost!r}")
        v = math.sqrt(float(cost))
        self.values.append(v)
        arr = np.asarray(self.values)
        lo, hi = (float(np.percentile(arr, 100 * self.q_low)), float(np.percentile(arr, 100 * self.q_high))) \
            if len(arr) >= 2 else (float(arr.min()), float(arr.max()))
        if hi - lo < self.eps:
            return 0.5
        return 1.0 - min(1.0, max(0.0, (v - lo) / (hi - lo)))


def _check_metric(metric: str) -> None:
    if metric not in ("em", "f1"):
        raise ValueError(f"router outcome: metric must be 'em' or 'f1', got {metric!r}")


def _column(name: str, values: Any, n: int) -> list[Any]:
    if values is None:
        raise KeyError(f"the router reward needs a `{name}` column")
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} completions")
    return list(values)


def make_format(members: list[str] = list(EMBEDDED_POOL)) -> RewardFn:  # noqa: B006 - never mutated
    def router_format(completions: list[str], **_: Any) -> list[float | None]:
        return [format_score(c, members) for c in completions]
    return router_format


def make_outcome(metric: str = "em") -> RewardFn:
    _check_metric(metric)

    def router_outcome(completions: list[str], answers: list[list[str]] | None = None, **_: Any) -> list[float | None]:
        golds = _column("answers", answers, len(completions))
        return [outcome_score(c, g, metric) for c, g in zip(completions, golds, strict=True)]
    return router_outcome


def make_cost(window: int = 1000, q_low: float = 0.05, q_high: float = 0.95) -> RewardFn:
    scale = RollingCostScale(window, q_low, q_high)

    def router_cost(completions: list[str], cost: list[float] | None = None, **_: Any) -> list[float | None]:
        return [scale(c) for c in _column("cost", cost, len(completions))]
    return router_cost


def make_router_r1(alpha: float = 0.0, metric: str = "em", members: list[str] = list(EMBEDDED_POOL),  # noqa: B006
                   window: int = 1000, q_low: float = 0.05, q_high: float = 0.95) -> RewardFn:
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"router_r1: alpha must be in [0, 1], got {alpha}")
    _check_metric(metric)
    scale = RollingCostScale(window, q_low, q_high)

    def router_r1(completions: list[str], answers: list[list[str]] | None = None, cost: list[float] | None = None,
                  **_: Any) -> list[float | None]:
        golds = _column("answers", answers, len(completions))
        costs = [scale(c) for c in _column("cost", cost, len(completions))]  # every response enters the window
        out = []
        for text, gold, c in zip(completions, golds, costs, strict=True):
            f = format_score(text, members)
            s = outcome_score(text, gold, metric)
            out.append(f if f < 0 or s <= 0 else (s + f) * (1.0 - alpha) + c * alpha)
        return out
    return router_r1


REWARDS = {
    "router_r1": make_router_r1,
    "router_format": make_format,
    "router_outcome": make_outcome,
    "router_cost": make_cost,
}
# The column the rollout adds (steps/core/rollouts/router.py: reward_columns), with a value.
COLUMNS = {"cost": 0.0}
