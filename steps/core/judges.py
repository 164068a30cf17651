"""Judges: Correctness C and Helpfulness H of a response, per the LiveThinking definitions.

- C = 1: every claim is verifiable in the documents D_t, consistent with the history H_t, and
  the response directly answers Q_t.
- H = 1: beyond answering, the response anticipates the user's likely need and adds relevant
  supplementary information grounded in the context.

`RuleJudge` approximates both without a model: for MuSiQue, C is the official EM of the
extracted answer against the gold answers and H asks that every bridge entity (the answers of
the intermediate hops) appears in the response (a 1-hop question has none: H asks that the
response cites the supporting fact); for e-commerce, C asks that the response
recalls a reference answer (or a label-2 document) and that every sentence is grounded in the
context, and H asks for a grounded sentence that recalls a label-1 (helpful) document.
Judges are chosen by name (`make_judge`); an LLM judge plugs in through the same protocol.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from steps.core.metrics import content_tokens, context_texts, coverage, exact_match, extract_answer, max_over, normalize_answer, sentences


@dataclass(frozen=True)
class Verdict:
    correct: int
    helpful: int
    rationale: str


class Judge(Protocol):
    name: str

    def judge(self, examples: list[dict[str, Any]], responses: list[str]) -> list[Verdict]:
        """One verdict per (example, response) pair, in order."""
        ...


def _recall(reference: str, response_tokens: set[str]) -> float:
    toks = content_tokens(reference)
    return sum(t in response_tokens for t in toks) / len(toks) if toks else 0.0


class RuleJudge:
    name = "rule"

    def __init__(self, grounding_threshold: float = 0.9, recall_threshold: float = 0.8):
        self.grounding_threshold = grounding_threshold
        self.recall_threshold = recall_threshold

    def judge(self, examples, responses):
        return [self.judge_one(e, r) for e, r in zip(examples, responses, strict=True)]

    def judge_one(self, example: dict[str, Any], response: str) -> Verdict:
        if not response.strip():
            return Verdict(0, 0, "empty response")
        if example["dataset"] == "musique":
            return self._musique(example, response)
        return self._ecommerce(example, response)

    def _musique(self, ex: dict[str, Any], response: str) -> Verdict:
        predicted = extract_answer(response)
        correct = int(max_over(exact_match, predicted, ex["answers"]) == 1.0)
        norm = f" {normalize_answer(response)} "
        missing = [b for b in ex["bridge"] if f" {normalize_answer(b)} " not in norm]
        if ex["bridge"]:
            helpful = int(not missing)
        else:  # a 1-hop question: helpful when the response cites the fact that answers it
            tokens = set(content_tokens(response))
            helpful = int(any(_recall(ex["documents"][i], tokens) >= self.recall_threshold
                              for i in ex.get("helpful_doc_idxs", ())))
        why = (f"answer {predicted!r} {'matches' if correct else 'does not match'} {ex['answers'][:3]}; "
               + (f"bridge missing {missing}" if missing else "bridge facts present" if ex["bridge"]
                  else "supporting fact cited" if helpful else "no bridge, supporting fact not cited"))
        return Verdict(correct, helpful, why)

    def _ecommerce(self, ex: dict[str, Any], response: str) -> Verdict:
        context = set(content_tokens(" ".join(context_texts(ex))))
        sents = sentences(response)
        ungrounded = [s for s in sents if coverage(s, context) < self.grounding_threshold]
        tokens = set(content_tokens(response))
        references = ex["answers"] or [ex["documents"][i] for i in ex["gold_doc_idxs"]]
        answered = max((_recall(r, tokens) for r in references), default=0.0) >= self.recall_threshold
        correct = int(answered and not ungrounded)
        helpful_docs = [ex["documents"][i] for i in ex["helpful_doc_idxs"]]
        helpful = int(any(coverage(s, context) >= self.grounding_threshold
                          and _recall(d, set(content_tokens(s))) >= self.recall_threshold
                          for s in sents for d in helpful_docs))
        why = ("answers the question" if answered else "does not recall a reference answer") + "; " + (
            f"ungrounded: {ungrounded[:2]}" if ungrounded else "all sentences grounded") + "; " + (
            "adds helpful grounded information" if helpful else "no helpful supplement")
        return Verdict(correct, helpful, why)


JUDGES: dict[str, str] = {"rule": "steps.core.judges:RuleJudge", "llm": "steps.core.judge_llm:LLMJudge"}


def make_judge(kind: str, **options: Any) -> Judge:
    if kind not in JUDGES:
        raise ValueError(f"unknown judge kind {kind!r}; known: {sorted(JUDGES)}")
    module, cls = JUDGES[kind].split(":")
    return getattr(importlib.import_module(module), cls)(**options)
