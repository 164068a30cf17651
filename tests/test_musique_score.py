"""`score-musique` on the real MuSiQue-Ans dev sample, checked against a separate implementation
of the official evaluate_v1.0.py rules written here from ../shared/data/README.md and the
official metric code (SQuAD normalisation, max over [answer] + aliases per metric, hotpot-style
support F1, means over answerable questions, 3 decimals)."""
from __future__ import annotations

import json
import random
import re
import string
from collections import Counter
from pathlib import Path

import pytest

from steps.core.io import InputError, read_jsonl, write_jsonl
from steps.core.musique_score import official_support_f1, score_files
from steps.evaluate import main as evaluate_main

# -- the official rules, written independently -----------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def off_normalize(s: str) -> str:
    s = s.lower().translate(_PUNCT_TABLE)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def off_em(pred: str, gold: str) -> int:
    return int(off_normalize(pred) == off_normalize(gold))


def off_f1(pred: str, gold: str) -> float:
    p, g = off_normalize(pred).split(), off_normalize(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def off_support_f1(pred: list, gold: list) -> float:
    ps, gs = {int(x) for x in pred}, {int(x) for x in gold}
    tp, fp, fn = len(ps & gs), len(ps - gs), len(gs - ps)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def official_scores(gold_rows: list[dict], pred_rows: list[dict]) -> dict[str, float]:
    assert len(gold_rows) == len(pred_rows)
    em = f1 = sup = 0.0
    count = 0
    for g, p in zip(gold_rows, pred_rows):  # the official script walks both files in step
        assert g["id"] == p["id"]
        if not g["answerable"]:
            continue
        answers = [g["answer"]] + g["answer_aliases"]
        em += max(off_em(p["predicted_answer"], a) for a in answers)
        f1 += max(off_f1(p["predicted_answer"], a) for a in answers)
        sup += off_support_f1(p["predicted_support_idxs"], [q["idx"] for q in g["paragraphs"] if q["is_supporting"]])
        count += 1
    return {"answer_f1": round(f1 / count, 3), "answer_em": round(em / count, 3), "support_f1": round(sup / count, 3)}


# -- predictions built from the real sample ----------------------------------------------------

def _perturb_answer(g: dict, rng: random.Random) -> str:
    answer = g["answer"]
    kind = rng.choice(["exact", "styled", "alias", "partial", "extra", "wrong", "empty"])
    if kind == "styled":  # case, punctuation and an article: equal after normalisation
        return f"The {answer.upper()}!"
    if kind == "alias" and g["answer_aliases"]:
        return rng.choice(g["answer_aliases"])
    if kind == "partial":
        return answer.split()[0]
    if kind == "extra":
        return f"{answer} and also {rng.choice(g['paragraphs'])['title']}"
    if kind == "wrong":
        return "zzyzx"
    if kind == "empty":
        return ""
    return answer


def _perturb_support(gold: list[int], n_paragraphs: int, rng: random.Random) -> list:
    kind = rng.choice(["gold", "subset", "superset", "empty", "shuffled_strings", "wrong"])
    if kind == "subset":
        return gold[:1]
    if kind == "superset":
        return gold + rng.sample([i for i in range(n_paragraphs) if i not in gold], 2)
    if kind == "empty":
        return []
    if kind == "shuffled_strings":  # the official script passes indices through int()
        return [str(i) for i in rng.sample(gold, len(gold))]
    if kind == "wrong":
        return [next(i for i in range(n_paragraphs) if i not in gold)]
    return list(gold)


def predictions(gold_rows: list[dict], seed: int | None) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for g in gold_rows:
        support = [p["idx"] for p in g["paragraphs"] if p["is_supporting"]]
        if seed is None:
            answer, pred_support = g["answer"], support
        else:
            answer, pred_support = _perturb_answer(g, rng), _perturb_support(support, len(g["paragraphs"]), rng)
        out.append({"id": g["id"], "predicted_answer": answer, "predicted_support_idxs": pred_support,
                    "predicted_answerable": True})
    return out


@pytest.fixture
def gold(shared_data: Path) -> tuple[Path, list[dict]]:
    path = shared_data / "musique_dev_sample.jsonl"
    return path, read_jsonl(path)


def test_gold_predictions_score_one(gold, tmp_path):
    path, rows = gold
    write_jsonl(tmp_path / "pred.jsonl", predictions(rows, None))
    assert score_files(path, tmp_path / "pred.jsonl") == {"answer_f1": 1.0, "answer_em": 1.0, "support_f1": 1.0}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_perturbed_predictions_match_the_official_rules(gold, tmp_path, seed):
    path, rows = gold
    preds = predictions(rows, seed)
    write_jsonl(tmp_path / "pred.jsonl", preds)
    ours = score_files(path, tmp_path / "pred.jsonl")
    assert ours == official_scores(rows, preds)
    assert 0.2 < ours["answer_em"] < ours["answer_f1"] < 0.9 and 0.2 < ours["support_f1"] < 0.9  # not trivial


def test_aliases_count_for_each_metric_separately(gold, tmp_path):
    path, rows = gold
    with_alias = [g for g in rows if g["answer_aliases"]]
    preds = [{"id": g["id"], "predicted_answer": (g["answer_aliases"][0] if g in with_alias else g["answer"]),
              "predicted_support_idxs": [], "predicted_answerable": True} for g in rows]
    write_jsonl(tmp_path / "pred.jsonl", preds)
    scores = score_files(path, tmp_path / "pred.jsonl")
    assert with_alias and scores["answer_em"] == 1.0 and scores["support_f1"] == 0.0
    assert scores == official_scores(rows, preds)


def test_reordered_predictions_score_the_same_and_the_cli_prints_json(gold, tmp_path, capsys):
    path, rows = gold
    preds = predictions(rows, 5)
    write_jsonl(tmp_path / "pred.jsonl", list(reversed(preds)))
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["score-musique", str(path), str(tmp_path / "pred.jsonl")])
    assert exit_.value.code == 0
    assert json.loads(capsys.readouterr().out) == official_scores(rows, preds)


def test_support_f1_follows_the_official_metric_on_edge_cases():
    assert official_support_f1([], []) == off_support_f1([], []) == 0.0  # official: undefined P and R are 0
    assert official_support_f1(["3", 5], [3, 5]) == 1.0
    assert official_support_f1([1, 2, 2], [2, 3]) == pytest.approx(0.5)


@pytest.mark.parametrize("edit,message", [
    (lambda p: p[:-1], r"199 predictions for 200 gold questions"),
    (lambda p: p + [dict(p[0], id="extra")], r"201 predictions for 200 gold questions"),
    (lambda p: [dict(p[0], id="2hop__nope")] + p[1:], r"musique_dev_sample.jsonl: line 1: id '.+' has no prediction"),
    (lambda p: p[:1] + [dict(p[1], id=p[0]["id"])] + p[2:], r"pred.jsonl: line 2: duplicate id"),
    (lambda p: [{k: v for k, v in p[0].items() if k != "predicted_answer"}] + p[1:],
     r"pred.jsonl: line 1: field 'predicted_answer' is missing"),
    (lambda p: p[:3] + [dict(p[3], predicted_support_idxs="1,2")] + p[4:],
     r"pred.jsonl: line 4: field 'predicted_support_idxs': expected a list"),
])
def test_mismatched_files_are_refused_by_name(gold, tmp_path, capsys, edit, message):
    path, rows = gold
    write_jsonl(tmp_path / "pred.jsonl", edit(predictions(rows, None)))
    with pytest.raises(InputError, match=message):
        score_files(path, tmp_path / "pred.jsonl")
    with pytest.raises(SystemExit) as exit_:
        evaluate_main(["score-musique", str(path), str(tmp_path / "pred.jsonl")])
    assert exit_.value.code == 2 and re.search(message, capsys.readouterr().err)
