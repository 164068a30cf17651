"""LiveThinking's rewards: correctness C, helpfulness H (one judge verdict per completion, shared),
the length band, grounded reasoning, and the think format.

    r = w_c * C + w_h * H + w_l * r_length (+ w_g * grounding)
    L_upper = lambda_upper * L_ref,  L_lower = lambda_lower * L_ref
    d = max(L_lower - L, 0) if L < L_lower;  max(L - L_upper, 0) if L > L_upper;  else 0
    r_length = max(0, 1 - d / epsilon)
L_ref is the RFT model's output length for the prompt (column `ref_length`); epsilon is a fraction
of L_ref (`epsilon_frac`) so that one value suits short and long prompts. The defaults of the
factories are the committed params' (params.yaml `grpo.rewards`), so that one place holds them.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

from steps.core.judges import Judge, Verdict, make_judge
from steps.core.prompts import split_completion
from steps.core.rewards import RewardFn

EXAMPLE_COLUMNS = ("id", "dataset", "documents", "history", "question", "answers",
                   "gold_doc_idxs", "helpful_doc_idxs", "bridge")


def length_reward(length: float, ref_length: float, lambda_lower: float, lambda_upper: float,
                  epsilon: float) -> float:
    """The paper's r_length: 1 inside [lambda_lower*L_ref, lambda_upper*L_ref], falling linearly
    to 0 at epsilon tokens outside the band."""
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    lower, upper = lambda_lower * ref_length, lambda_upper * ref_length
    d = lower - length if length < lower else length - upper if length > upper else 0.0
    return max(0.0, 1.0 - d / epsilon)


def examples_of(n: int, columns: dict[str, Any]) -> list[dict[str, Any]]:
    missing = [c for c in EXAMPLE_COLUMNS if c not in columns]
    if missing:
        raise KeyError(f"reward needs dataset columns {missing}")
    return [{c: columns[c][i] for c in EXAMPLE_COLUMNS} for i in range(n)]


def policy_lengths(completions: list[str], completion_ids: list[list[int]] | None,
                   policy_tokens: list[int] | None) -> list[int]:
    """Tokens the policy wrote per completion: the rollout's count (inserted tokens excluded) when
    it gave one, else the completion's ids. Never a word count: a length reward on words would
    measure another unit than the band's L_ref."""
    if policy_tokens is not None:
        return [int(n) for n in policy_tokens]
    if completion_ids is None:
        raise KeyError("the length reward needs `completion_ids` or `policy_tokens` (token counts)")
    return [len(ids) for ids in completion_ids]


class SharedVerdicts:
    """One judge verdict per (example, response), shared by the rewards that read it: correctness
    and helpfulness ask the same question of the judge, and an LLM judge must be asked once."""

    _judges: dict[str, tuple[Judge, OrderedDict]] = {}
    capacity = 8192

    @classmethod
    def get(cls, kind: str, options: dict[str, Any], examples: list[dict[str, Any]],
            responses: list[str]) -> list[Verdict]:
        key = repr((kind, sorted(options.items())))
        if key not in cls._judges:
            cls._judges[key] = (make_judge(kind, **options), OrderedDict())
        judge, memo = cls._judges[key]
        keys = [(e["dataset"], e["id"], r) for e, r in zip(examples, responses, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in memo]
        if todo:
            fresh = judge.judge([examples[i] for i in todo], [responses[i] for i in todo])
            for i, v in zip(todo, fresh, strict=True):
                memo[keys[i]] = v
        out = [memo[k] for k in keys]
        while len(memo) > cls.capacity:
            memo.popitem(last=False)
        return out


def _verdicts(judge: str, options: dict[str, Any], completions: list[str], columns: dict[str, Any]) -> list[Verdict]:
    responses = [split_completion(c)[1] for c in completions]
    return SharedVerdicts.get(judge, options, examples_of(len(completions), columns), responses)


def make_correctness(judge: str = "rule", **judge_options: Any) -> RewardFn:
    def correctness(completions: list[str], **columns: Any) -> list[float | None]:
        return [float(v.correct) for v in _verdicts(judge, judge_options, completions, columns)]
    return correctness


def make_helpfulness(judge: str = "rule", when_correct: bool = False, **judge_options: Any) -> RewardFn:
    """H, the judge's helpfulness verdict. `when_correct: true` pays it only beside a correct
    answer (H * C): on e-commerce the helpful supplement is another attribute of the asked
    product, so an answer that states that attribute instead of the asked one is judged helpful
    and wrong, and with H paid alone (at params.yaml's equal weights) it earns what a right answer
    without the supplement earns.
    The paper's formula adds H ungated (the default); the gate is a departure, measured in the
    README ("The same reading on the main kind")."""
    def helpfulness(completions: list[str], **columns: Any) -> list[float | None]:
        return [float(v.helpful and (v.correct or not when_correct))
                for v in _verdicts(judge, judge_options, completions, columns)]
    return helpfulness


def make_length(lambda_lower: float = 0.2, lambda_upper: float = 0.4, epsilon_frac: float = 0.4) -> RewardFn:
    if not 0 <= lambda_lower <= lambda_upper:
        raise ValueError(f"the length reward needs 0 <= lambda_lower <= lambda_upper, got {lambda_lower}, {lambda_upper}")
    if epsilon_frac <= 0:
        raise ValueError(f"the length reward needs epsilon_frac > 0, got {epsilon_frac}")

    def length(completions: list[str], completion_ids: list[list[int]] | None = None,
               ref_length: list[float] | None = None, policy_tokens: list[int] | None = None,
               **_: Any) -> list[float | None]:
        if ref_length is None:
            raise KeyError("the length reward needs a `ref_length` column (the RFT model's output length)")
        lengths = policy_lengths(completions, completion_ids, policy_tokens)
        return [length_reward(n, ref, lambda_lower, lambda_upper, epsilon_frac * ref)
                for n, ref in zip(lengths, ref_length, strict=True)]
    return length


def make_grounding(unit: str = "context", threshold: float = 0.9, aggregate: str = "mean",
                   framing: bool = False) -> RewardFn:
    """Grounded reasoning, on the thinking. Without it GRPO's length pressure can collapse the
    trace into a fixed string that no longer reads the documents; filler sentences score low too.

    unit `context`: the share of the thinking's content words found anywhere in the context
    (documents, history, question). unit `claim`: the share of the thinking's sentences that one
    source (a document, a history turn or the question) supports, each with at least `threshold`
    of its content words, as the judges' "every claim is verifiable in D_t" reads. The difference
    is the chimera: "the orbix jacket is red ." when the orbix jacket is green and red belongs to
    the zentra jacket of the next listing has every word in the context (1.0 by `context`) but
    no source that says it (0 by `claim`). Such sentences are how the embedded default's student
    answers e-commerce questions wrongly (README, Measured results).

    aggregate (unit `claim` only) `mean`: the share of supported sentences, which also rewards
    adding sentences a listing supports (restated facts: on dev the answers stayed long); `all`:
    1 when every sentence is supported, else 0, so one chimera costs the whole reward and a
    supported sentence more earns nothing.

    framing: the user turn as the model reads it (`documents : [1] ... question : ... reply with :
    the answer is X .`) is a source too, so restating the question (`the question is : what size
    is it ?`) is grounded; without it the word `question` is in no source, and GRPO drops the
    restatement. On dev the restatement came back with it and e-commerce correctness did not
    (README, "What GRPO changes in the e-commerce answers")."""
    from steps.core.metrics import content_tokens, context_texts, coverage, sentences
    from steps.core.prompts import user_turn

    if unit not in ("context", "claim"):
        raise ValueError(f"grounding.unit: expected 'context' or 'claim', got {unit!r}")
    if not 0 < threshold <= 1:
        raise ValueError(f"grounding.threshold: expected a number in (0, 1], got {threshold!r}")
    if aggregate not in ("mean", "all") or (unit == "context" and aggregate != "mean"):
        raise ValueError(f"grounding.aggregate: expected 'mean' or 'all' (unit claim only), got {aggregate!r}")

    def grounding(completions: list[str], **columns: Any) -> list[float | None]:
        # A GRPO batch holds each prompt K times: its context's word sets are built once a call.
        vocab: dict[tuple[str, ...], list[set[str]]] = {}
        out = []
        for c, ex in zip(completions, examples_of(len(completions), columns), strict=True):
            thinking = split_completion(c)[0]
            texts = tuple(context_texts(ex)) + ((user_turn(ex),) if framing else ())
            if texts not in vocab:
                vocab[texts] = ([set(content_tokens(" ".join(texts)))] if unit == "context"
                                else [set(content_tokens(t)) for t in texts])
            sources = vocab[texts]
            if not thinking:
                out.append(0.0)
            elif unit == "context":
                out.append(coverage(thinking, sources[0]))
            else:
                claims = sentences(thinking)
                held = [max(coverage(s, v) for v in sources) >= threshold for s in claims]
                out.append(sum(held) / len(held) if aggregate == "mean" else float(all(held)))
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


REWARDS = {
    "correctness": make_correctness,
    "helpfulness": make_helpfulness,
    "length": make_length,
    "format": make_format,
    "grounding": make_grounding,
}
