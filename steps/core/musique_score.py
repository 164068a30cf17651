"""Score predictions in the official MuSiQue format against an official gold file.

    python -m steps.evaluate score-musique GOLD.jsonl PRED.jsonl

PRED lines: {id, predicted_answer, predicted_support_idxs, predicted_answerable}. Prints JSON
with answer_em, answer_f1 and support_f1, rounded to 3 decimals as the official
evaluate_v1.0.py prints them: means over the answerable gold questions (on MuSiQue-Ans every
question). Files must hold the same ids, one line each: a mismatch is refused, naming it.
Where we depart: the official script also demands the same line order; here lines are joined
by id, so a reordered prediction file scores the same instead of failing.

Support F1 is the official SupportMetric (hotpot_eval's), not `metrics.support_f1`: indices
pass through int() and an empty predicted set scores 0 even against an empty gold set (the
shared helper counts that as 1). On MuSiQue-Ans the gold set is never empty, so the two agree
on real data, but this file promises the official numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from steps.core.io import InputError, iter_jsonl
from steps.core.metrics import exact_match, max_over, token_f1


def official_support_f1(predicted: list[int], gold: list[int]) -> float:
    """evaluate_v1.0.py's SupportMetric F1: precision and recall are 0 when undefined."""
    pred_set, gold_set = set(map(int, predicted)), set(map(int, gold))
    tp = len(pred_set & gold_set)
    precision = tp / len(pred_set) if pred_set else 0.0
    recall = tp / len(gold_set) if gold_set else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _int_like(value: object) -> bool:
    try:
        int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return False
    return True


def score_files(gold_path: Path | str, pred_path: Path | str) -> dict[str, float]:
    gold = list(iter_jsonl(gold_path))
    pred = list(iter_jsonl(pred_path))
    if len(gold) != len(pred):
        raise InputError(f"{pred_path}: {len(pred)} predictions for {len(gold)} gold questions in {gold_path}; "
                         "the official format needs exactly one line per question")
    by_id: dict[str, dict] = {}
    for lineno, p in pred:
        for field in ("id", "predicted_answer", "predicted_support_idxs"):
            if field not in p:
                raise InputError(f"{pred_path}: line {lineno}: field '{field}' is missing")
        idxs = p["predicted_support_idxs"]
        if not isinstance(idxs, list) or not all(_int_like(i) for i in idxs):
            raise InputError(f"{pred_path}: line {lineno}: field 'predicted_support_idxs': expected a list of "
                             f"paragraph indices, got {idxs!r}")
        if p["id"] in by_id:
            raise InputError(f"{pred_path}: line {lineno}: duplicate id {p['id']!r}")
        by_id[p["id"]] = p
    ems, f1s, sups = [], [], []
    for lineno, g in gold:
        if g.get("id") not in by_id:
            raise InputError(f"{gold_path}: line {lineno}: id {g.get('id')!r} has no prediction in {pred_path}")
        if not g.get("answerable", True):
            continue
        p = by_id[g["id"]]
        answers = [g["answer"], *g.get("answer_aliases", [])]
        ems.append(max_over(exact_match, str(p["predicted_answer"]), answers))
        f1s.append(max_over(token_f1, str(p["predicted_answer"]), answers))
        gold_support = [q["idx"] for q in g["paragraphs"] if q.get("is_supporting")]
        sups.append(official_support_f1(p["predicted_support_idxs"], gold_support))
    mean = lambda xs: round(sum(xs) / len(xs), 3) if xs else 0.0  # noqa: E731
    return {"answer_f1": mean(f1s), "answer_em": mean(ems), "support_f1": mean(sups)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.evaluate score-musique", description=__doc__.split("\n")[0])
    ap.add_argument("gold")
    ap.add_argument("pred")
    args = ap.parse_args(argv)
    try:
        print(json.dumps(score_files(args.gold, args.pred)))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
