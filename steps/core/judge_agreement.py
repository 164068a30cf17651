"""How far a judge agrees with reference labels: accuracy and Cohen's kappa per criterion.

    python -m steps.core.judge_agreement data/judge/judged.jsonl labels.jsonl [--fields correct helpful]

Both files are JSONL rows with `id`, optionally `sample_idx`, and 0/1 label fields (a
judged.jsonl from another judge works as the labels file: rule vs LLM judge). Rows are joined
on (id, sample_idx); a row of either file without a partner is an error naming its line.
Kappa corrects accuracy for the agreement two raters reach by chance alone, which matters
here: keep rates are skewed, so a judge that always says 1 can look accurate.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

from steps.core.io import InputError, iter_jsonl


def _check_lengths(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"label sequences differ in length: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no labels to compare")


def accuracy(predicted: Sequence[Hashable], reference: Sequence[Hashable]) -> float:
    _check_lengths(predicted, reference)
    return sum(p == r for p, r in zip(predicted, reference)) / len(predicted)


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """(p_o - p_e) / (1 - p_e), p_e from each rater's own label frequencies. NaN when chance
    agreement is already 1 (both raters give one and the same label throughout): undefined,
    as in scikit-learn, rather than a misleading 0 or 1."""
    _check_lengths(a, b)
    n = len(a)
    p_o = sum(x == y for x, y in zip(a, b)) / n
    count_a, count_b = Counter(a), Counter(b)
    p_e = sum(count_a[k] * count_b[k] for k in set(count_a) | set(count_b)) / (n * n)
    if p_e == 1.0:
        return float("nan")
    return (p_o - p_e) / (1.0 - p_e)


def confusion(predicted: Sequence[int], reference: Sequence[int]) -> dict[str, int]:
    """Binary confusion counts, reference as the truth."""
    _check_lengths(predicted, reference)
    pairs = Counter(zip(predicted, reference))
    return {"tp": pairs[(1, 1)], "fp": pairs[(1, 0)], "fn": pairs[(0, 1)], "tn": pairs[(0, 0)]}


def _keyed(path: Path | str, fields: Sequence[str]) -> dict[tuple[str, int], tuple[int, dict[str, int]]]:
    out: dict[tuple[str, int], tuple[int, dict[str, int]]] = {}
    for lineno, row in iter_jsonl(path):
        if "id" not in row:
            raise InputError(f"{path}: line {lineno}: field 'id' is missing")
        key = (str(row["id"]), int(row.get("sample_idx", 0)))
        if key in out:
            raise InputError(f"{path}: line {lineno}: duplicate (id, sample_idx) {key}; first on line {out[key][0]}")
        labels = {}
        for f in fields:
            v = row.get(f)
            if isinstance(v, bool) or v not in (0, 1):
                raise InputError(f"{path}: line {lineno}: field '{f}': expected 0 or 1, got {v!r}")
            labels[f] = int(v)
        out[key] = (lineno, labels)
    return out


def agreement(judged_path: Path | str, labels_path: Path | str,
              fields: Sequence[str] = ("correct", "helpful")) -> dict[str, dict[str, Any]]:
    judged, labels = _keyed(judged_path, fields), _keyed(labels_path, fields)
    for src, src_path, other, other_path in ((judged, judged_path, labels, labels_path),
                                             (labels, labels_path, judged, judged_path)):
        for key, (lineno, _) in src.items():
            if key not in other:
                raise InputError(f"{src_path}: line {lineno}: (id, sample_idx) {key} has no row in {other_path}")
    keys = sorted(judged)
    report = {}
    for f in fields:
        pred = [judged[k][1][f] for k in keys]
        ref = [labels[k][1][f] for k in keys]
        report[f] = {"n": len(keys), "accuracy": accuracy(pred, ref), "kappa": cohen_kappa(pred, ref),
                     **confusion(pred, ref)}
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m steps.core.judge_agreement", description=__doc__.split("\n")[0])
    ap.add_argument("judged", help="JSONL of the judge under test (e.g. data/judge/judged.jsonl)")
    ap.add_argument("labels", help="JSONL of reference labels (people, or another judge)")
    ap.add_argument("--fields", nargs="+", default=["correct", "helpful"])
    args = ap.parse_args(argv)
    try:
        report = agreement(args.judged, args.labels, args.fields)
        for stats in report.values():  # strict JSON has no NaN: an undefined kappa prints as null
            stats["kappa"] = None if stats["kappa"] != stats["kappa"] else stats["kappa"]
        print(json.dumps(report, indent=2))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
