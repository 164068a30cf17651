import json

import pytest

from steps.core.metrics import exact_match, extract_answer, max_over, normalize_answer, support_f1, token_f1


# Official MuSiQue normalisation: lower-case, drop ASCII punctuation, a/an/the -> space, collapse spaces.
@pytest.mark.parametrize("raw,norm", [
    ("The Eiffel Tower", "eiffel tower"),
    ("  an  Apple, a day!", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # "the" inside a word stays
    ("U.S.A.", "usa"),
    ("", ""),
])
def test_normalize(raw, norm):
    assert normalize_answer(raw) == norm


#  prediction        | gold              | EM | F1
#  "Paris"           | "paris"           | 1  | 1
#  "the city Paris"  | "Paris"           | 0  | 2/3 (p=1/2, r=1)
#  "New York City"   | "New York"        | 0  | 0.8
#  ""                | "x"               | 0  | 0   (only one empty)
#  "the"             | "a"               | 1  | 1   (both normalise to empty)
@pytest.mark.parametrize("pred,gold,em,f1", [
    ("Paris", "paris", 1.0, 1.0), ("the city Paris", "Paris", 0.0, 2 / 3), ("New York City", "New York", 0.0, 0.8),
    ("", "x", 0.0, 0.0), ("the", "a", 1.0, 1.0)])
def test_em_f1_table(pred, gold, em, f1):
    assert exact_match(pred, gold) == em
    assert token_f1(pred, gold) == pytest.approx(f1)


def test_max_over_aliases_is_independent_per_metric():
    golds = ["Barack Obama", "Obama"]
    assert max_over(exact_match, "obama", golds) == 1.0
    assert max_over(token_f1, "president obama", golds) == pytest.approx(2 / 3)


@pytest.mark.parametrize("pred,gold,f1", [([], [], 1.0), ([1], [], 0.0), ([1, 2], [2, 3], 0.5), ([4], [4], 1.0)])
def test_support_f1(pred, gold, f1):
    assert support_f1(pred, gold) == pytest.approx(f1)


@pytest.mark.parametrize("response,answer", [
    ("the answer is kestria . zono was born in dadada .", "kestria"),
    ("The answer is: New York City.", "New York City"),
    ("Paris. It is in France.", "Paris."),
    ("", ""),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_official_normalisation_on_the_real_sample(shared_data):
    """On real MuSiQue answers: a gold answer with changed case, an article and trailing
    punctuation still matches (EM 1, F1 1), while another question's answer matches only when
    the two answers normalise to the same string."""
    rows = [json.loads(line) for line in (shared_data / "musique_dev_sample.jsonl").open()]
    assert len(rows) == 200
    for r, other in zip(rows, rows[1:] + rows[:1]):
        golds = [r["answer"], *r["answer_aliases"]]
        assert max_over(exact_match, "The " + r["answer"].upper() + " .", golds) == 1.0
        assert max_over(token_f1, r["answer"].upper() + "!", golds) == 1.0
        same = any(normalize_answer(other["answer"]) == normalize_answer(g) for g in golds)
        assert max_over(exact_match, other["answer"], golds) == float(same)
