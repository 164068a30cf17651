"""RelayLLM's difficulty-aware reward (arXiv 2601.05167).

With `ratio` = teacher tokens / all tokens of the response, and "a call" = the response holds
teacher tokens, the reward of a response depends on what its query group (the K rollouts of
one prompt) achieved:

    some rollout solved it without a call:  correct, no call 1.5 | correct, call 1 - ratio | wrong 0
    else some solved it with a call:        correct, call 1 - ratio | wrong, no call -1 | wrong, call 0
    else (nobody solved it):                call ratio | no call 0

Easy queries teach independence (solving alone earns most), queries the student solves only
with help teach calling sparingly, and hopeless ones reward asking at all.

Where we depart from the reference code (Chengsong-Huang/RelayLLM): the paper defines the three
cases per query group; the reference computes the two flags over whatever batch its reward
function receives (several prompts together), so one easy prompt in the batch changes the
rewards of every other. Here the flags are per group: the rows of one `group` (the command line
scores each group apart), else of one prompt (the trainer passes `prompts`); rows with neither
are one group. Its ratio counts the
teacher's tokens actually inserted (the rollout's count), not the sum of the n the student asked
for. Teacher tokens are masked out of the student's loss by the relay rollout's ownership mask
(steps.core.rollouts.relay; the reference leaves them in).

Columns: `answers` (gold answers; correctness is the exact match of the extracted answer, after
the command tags are removed, unless `judge` names a judge of steps.core.judges, which then
reads the example columns), `teacher_tokens` and `total_tokens` (command line), or the
trainer's `external_tokens` and `policy_tokens`, and optionally `group`. Rows without a teacher
count were decoded without relay: no call.

    python -m steps.core.rewards score --reward relay_difficulty ROWS.jsonl
"""
from __future__ import annotations

from typing import Any

from steps.core.rewards import RewardFn


def group_reward(correct: bool, called: bool, ratio: float, solved_alone: bool, solved_with_call: bool,
                 no_call_bonus: float = 1.5) -> float:
    """One response's reward given its group's two flags (the table in the module docstring)."""
    if solved_alone:
        return no_call_bonus if correct and not called else (1.0 - ratio) if correct else 0.0
    if solved_with_call:
        if correct and called:
            return 1.0 - ratio
        return 0.0 if called else -1.0  # a correct response here has a call, by the flags
    return ratio if called else 0.0


def _column(columns: dict[str, Any], *names: str) -> list[Any] | None:
    return next((columns[n] for n in names if columns.get(n) is not None), None)


def make_relay_difficulty(judge: str = "answer", no_call_bonus: float = 1.5, **judge_options: Any) -> RewardFn:
    from steps.core.metrics import exact_match, extract_answer, max_over
    from steps.core.prompts import split_completion
    from steps.core.rollouts.relay import strip_commands

    correctness = None
    if judge != "answer":
        from steps.core.rewards.livethinking import make_correctness
        correctness = make_correctness(judge, **judge_options)

    def relay_difficulty(completions: list[str], **columns: Any) -> list[float | None]:
        n = len(completions)
        clean = [strip_commands(c) for c in completions]
        if correctness is not None:
            correct = [bool(v) for v in correctness(clean, **columns)]
        else:
            answers = _column(columns, "answers")
            if answers is None:
                raise KeyError("relay_difficulty needs an `answers` column (the gold answers)")
            correct = [max_over(exact_match, extract_answer(split_completion(c)[1]), a) == 1.0
                       for c, a in zip(clean, answers, strict=True)]
        # No teacher column: responses decoded without relay, hence without a call.
        teacher = _column(columns, "teacher_tokens", "external_tokens") or [0] * n
        total = _column(columns, "total_tokens")
        if total is None:
            policy = _column(columns, "policy_tokens")
            ids = _column(columns, "completion_ids")
            if policy is None and ids is None:
                raise KeyError("relay_difficulty needs `total_tokens` (or the rollout's `policy_tokens`)")
            total = ([int(p) + int(t) for p, t in zip(policy, teacher, strict=True)] if policy is not None
                     else [len(i) for i in ids])
        called = [int(t) > 0 for t in teacher]
        ratio = [min(1.0, int(t) / int(a)) if int(a) > 0 else 0.0 for t, a in zip(teacher, total, strict=True)]
        keys = _column(columns, "group", "prompts") or [None] * n
        groups: dict[Any, list[int]] = {}
        for i, k in enumerate(keys):
            groups.setdefault(repr(k), []).append(i)
        out: list[float | None] = [None] * n
        for idx in groups.values():
            alone = any(correct[i] and not called[i] for i in idx)
            helped = any(correct[i] and called[i] for i in idx)
            for i in idx:
                out[i] = group_reward(correct[i], called[i], ratio[i], alone, helped, no_call_bonus)
        return out
    return relay_difficulty


REWARDS = {"relay_difficulty": make_relay_difficulty}
