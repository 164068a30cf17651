"""Answer metrics shared by the judge, the rewards and evaluation.

The MuSiQue rules follow the official evaluate_v1.0.py: lower-case, drop ASCII punctuation,
replace whole-word a/an/the by a space, collapse whitespace; EM and token-multiset F1 take
their max over [answer] + answer_aliases; support F1 compares paragraph index sets, both
empty counting as 1.
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    num_same = sum(common.values())
    if len(pred_toks) == 0 or len(gold_toks) == 0:
        # The official script: F1 is 1 when both are empty, 0 when only one is.
        return float(pred_toks == gold_toks)
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_toks)
    recall = num_same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def max_over(metric, prediction: str, golds: Sequence[str]) -> float:
    return max((metric(prediction, g) for g in golds), default=0.0)


def support_f1(predicted: Iterable[int], gold: Iterable[int]) -> float:
    p, g = set(predicted), set(gold)
    if not p and not g:
        return 1.0
    tp = len(p & g)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(p), tp / len(g)
    return 2 * precision * recall / (precision + recall)


# Words that carry no claim; a response sentence is "grounded" when its other words all occur
# in the context (documents, history, question).
STOPWORDS = frozenset(
    "a an the is are was were be been it its this that these those of in on at to for from by "
    "with and or but so as also yes no not do does did has have had can will would should may "
    "i you we they he she my your our their me us them answer user asks about what which who "
    "where when how want know might".split()
)


def content_tokens(text: str) -> list[str]:
    return [t for t in normalize_answer(text).split() if t not in STOPWORDS]


def context_texts(example: dict) -> list[str]:
    """What an answer may be grounded in: the example's documents, its history turns and its
    question, in that order (the rule judge and the grounding reward read the same list)."""
    return list(example["documents"]) + [t["content"] for t in example["history"]] + [example["question"]]


def coverage(text: str, vocabulary: set[str]) -> float:
    """Fraction of the content tokens of `text` found in `vocabulary` (1.0 when it has none)."""
    toks = content_tokens(text)
    if not toks:
        return 1.0
    return sum(t in vocabulary for t in toks) / len(toks)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENT_SPLIT.split(text.strip()) if s.strip()]


_ANSWER_IS = re.compile(r"answer is\s*:?\s*(.+?)(?:\s*[.!?](?:\s|$)|$)", re.IGNORECASE | re.DOTALL)


def extract_answer(response: str) -> str:
    """The short answer in a response: the text after the last "answer is", else the first
    sentence. The prompt asks for "The answer is X." so that EM is well defined."""
    matches = _ANSWER_IS.findall(response)
    if matches:
        return matches[-1].strip()
    sents = sentences(response)
    return sents[0] if sents else ""
