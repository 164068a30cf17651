"""Hybrid thinking's rewards: AdaptThink's constrained reward and AdaCoT's trigger penalties.

**The think format.** A completion is `<think> T </think> R`; T empty (`<think> </think> R`) is a
NoThinking response. Who writes the opener depends on the chat template:
- `think_opened_by: completion` (our template, and Qwen3's hybrid template in thinking mode: the
  generation prompt ends at the assistant tag and the model writes `<think>` itself): the
  completion must start with `<think>`, and after that opener hold no other `<think>` and
  exactly one `</think>`;
- `think_opened_by: prompt` (DeepSeek-R1-style templates, which end the prompt with `<think>`):
  the reference's rule as it stands, no `<think>` in the completion and exactly one `</think>`.
Both say the same thing: exactly one thinking block, closed exactly once. A completion that
breaks it gets accuracy 0, never an exception (an unfinished trace, a second block, a stray
opener all happen in rollouts).

**AdaptThink** (arXiv 2505.13417, THU-KEG/AdaptThink):
    r = acc - ref_accuracy + delta * [the rollout was forced to NoThinking]
`acc` is the judge's correctness of the response (the text after `</think>`), 0 when the format
fails; `ref_accuracy` is the mean accuracy of K thinking samples of the starting policy on the
prompt (steps/adaptthink.py measures it). The bonus follows the rollout's forcing, not what the
text looks like, as in the reference's reward manager: in training every rollout is forced one
way or the other (steps/core/rollouts/hybrid.py says which in the `forced_nothinking` column).
Acc comes from the judge that every stage uses (the rule judge: MuSiQue EM of the extracted
answer; e-commerce recall and grounding), where the reference checks a boxed math answer; a row
that has `answers` and no `dataset` (the command line) is judged as a MuSiQue row, by EM.

**AdaCoT** (arXiv 2505.11896, no code published): the trigger penalties, added to the base reward
(`correctness`, weighted apart in params):
    r_trigger = -(missed_cot * P_miss + unneeded_cot * P_over + bad_format * P_fmt)
P_miss = 1 when the question needed a CoT and the thinking is empty; P_over = 1 when it did not
and the thinking is not empty; P_fmt = 1 when the think format fails (then neither trigger
penalty is charged: no decision was readable). Whether a question needs a CoT is not labelled in
our data as in the paper (there an LLM labels each query against written principles); we read
it from the example's hop count: `hops >= min_hops` needs thinking. A row without `hops` gets no
trigger penalty (only the format one).

    python -m steps.core.rewards score --reward adaptthink ROWS.jsonl   # answers, ref_accuracy, forced_nothinking
    python -m steps.core.rewards score --reward adacot_trigger ROWS.jsonl   # hops
"""
from __future__ import annotations

import math
from typing import Any

from steps.core.judges import make_judge
from steps.core.prompts import THINK_CLOSE, THINK_OPEN, split_completion
from steps.core.rewards import RewardFn
from steps.core.rewards.livethinking import EXAMPLE_COLUMNS

CONVENTIONS = ("completion", "prompt")


def format_ok(completion: str, think_opened_by: str = "completion") -> bool:
    """Exactly one thinking block, closed exactly once (module docstring)."""
    if think_opened_by not in CONVENTIONS:
        raise ValueError(f"think_opened_by must be one of {CONVENTIONS}, got {think_opened_by!r}")
    text = completion.strip()
    if think_opened_by == "completion":
        if not text.startswith(THINK_OPEN):
            return False
        text = text[len(THINK_OPEN):]
    return THINK_OPEN not in text and text.count(THINK_CLOSE) == 1


def thinks(completion: str) -> bool:
    """The completion has a non-empty thinking (the think ratio counts these)."""
    return bool(split_completion(completion)[0])


def _examples(n: int, columns: dict[str, Any]) -> list[dict[str, Any]]:
    if "answers" not in columns:
        raise KeyError("the reward needs an `answers` column (the gold answers)")
    rows = []
    for i in range(n):
        row = {c: columns[c][i] for c in EXAMPLE_COLUMNS if c in columns}
        # The command line's minimal rows: scored as the rule judge scores MuSiQue (EM).
        row.setdefault("dataset", "musique")
        row.setdefault("bridge", [])
        row.setdefault("id", f"row {i + 1}")
        rows.append(row)
    return rows


def accuracy(completions: list[str], columns: dict[str, Any], judge: str = "rule",
             think_opened_by: str = "completion", **judge_options: Any) -> list[float]:
    """acc per completion: the judge's correctness of the response, 0 when the format fails."""
    examples = _examples(len(completions), columns)
    ok = [format_ok(c, think_opened_by) for c in completions]
    todo = [i for i in range(len(completions)) if ok[i]]
    acc = [0.0] * len(completions)
    if todo:
        verdicts = make_judge(judge, **judge_options).judge(
            [examples[i] for i in todo], [split_completion(completions[i])[1] for i in todo])
        for i, v in zip(todo, verdicts, strict=True):
            acc[i] = float(v.correct)
    return acc


def _flag(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    raise ValueError(f"{where}: forced_nothinking must be true or false, got {value!r}")


def make_adaptthink(delta: float = 0.05, judge: str = "rule", think_opened_by: str = "completion",
                    **judge_options: Any) -> RewardFn:
    if think_opened_by not in CONVENTIONS:
        raise ValueError(f"adaptthink.think_opened_by must be one of {CONVENTIONS}, got {think_opened_by!r}")

    def adaptthink(completions: list[str], ref_accuracy: list[float] | None = None,
                   forced_nothinking: list[bool] | None = None, **columns: Any) -> list[float | None]:
        if ref_accuracy is None:
            raise KeyError("the adaptthink reward needs a `ref_accuracy` column (steps/adaptthink.py's reference pass)")
        if forced_nothinking is None:
            raise KeyError("the adaptthink reward needs a `forced_nothinking` column (the rollout's forcing)")
        ids = columns.get("id") or [f"row {i + 1}" for i in range(len(completions))]
        for i, ref in enumerate(ref_accuracy):
            if ref is None or isinstance(ref, bool) or not isinstance(ref, (int, float)) or math.isnan(ref) \
                    or not 0.0 <= ref <= 1.0:
                raise ValueError(f"prompt {ids[i]}: ref_accuracy must be a number in [0, 1], got {ref!r}")
        forced = [_flag(f, f"prompt {ids[i]}") for i, f in enumerate(forced_nothinking)]
        acc = accuracy(completions, columns, judge, think_opened_by, **judge_options)
        return [a - float(ref) + (delta if f else 0.0) for a, ref, f in zip(acc, ref_accuracy, forced, strict=True)]
    return adaptthink


def needs_cot(hops: Any, min_hops: int) -> bool | None:
    """AdaCoT's label read from the hop count; None when the example has none."""
    if hops is None:
        return None
    if isinstance(hops, bool) or not isinstance(hops, int):
        raise ValueError(f"hops must be an integer, got {hops!r}")
    return hops >= min_hops


def make_adacot_trigger(missed_cot: float = 1.0, unneeded_cot: float = 0.5, bad_format: float = 1.0,
                        min_hops: int = 2, think_opened_by: str = "completion") -> RewardFn:
    for name, value in (("missed_cot", missed_cot), ("unneeded_cot", unneeded_cot), ("bad_format", bad_format)):
        if value < 0:
            raise ValueError(f"adacot_trigger.{name} is a penalty coefficient: it must be >= 0, got {value}")
    if think_opened_by not in CONVENTIONS:
        raise ValueError(f"adacot_trigger.think_opened_by must be one of {CONVENTIONS}, got {think_opened_by!r}")

    def adacot_trigger(completions: list[str], hops: list[int | None] | None = None, **_: Any) -> list[float | None]:
        hops = hops if hops is not None else [None] * len(completions)
        out = []
        for c, h in zip(completions, hops, strict=True):
            if not format_ok(c, think_opened_by):
                out.append(-bad_format)
                continue
            need, thought = needs_cot(h, min_hops), thinks(c)
            out.append(-(missed_cot * float(need is True and not thought)
                         + unneeded_cot * float(need is False and thought)))
        return out
    return adacot_trigger


REWARDS = {"adaptthink": make_adaptthink, "adacot_trigger": make_adacot_trigger}
# Columns these rewards read that an example does not carry (the method's stage adds them), with a
# value of the right type: `python -m steps.core.rewards list` shows them, the tests fill rows with them.
COLUMNS = {"ref_accuracy": 0.5, "forced_nothinking": False}
