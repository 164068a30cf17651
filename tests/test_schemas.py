"""Every schema rejects a bad row with a message naming the file, the line and the field."""
import pytest

from steps.core.io import InputError
from steps.core.schemas import CANDIDATES, EXAMPLES, JUDGED, PREDICTIONS, validate

EXAMPLE = {"id": "a", "dataset": "musique", "documents": ["x y ."], "history": [], "question": "q ?",
           "answers": ["y"], "gold_doc_idxs": [0], "helpful_doc_idxs": [], "bridge": [], "hops": 1}
CANDIDATE = {"id": "a", "dataset": "musique", "sample_idx": 0, "completion": "<think> t </think> r", "thinking": "t",
             "response": "r", "completion_tokens": 5, "finish_reason": "stop", "model": "teacher"}
JUDGED_ROW = {**CANDIDATE, "correct": 1, "helpful": 0, "rationale": "why", "keep": False}
PREDICTION = {"model": "rft", "dataset": "musique", "id": "a", "completion": "c", "response": "r",
              "hops": 1, "predicted_answer": "y", "em": 1.0, "f1": 1.0, "correct": 1, "helpful": 0, "completion_tokens": 3, "external_tokens": 0, "extras": {},
              "decode_tflops": 1e-6, "prefill_tflops": 1e-6, "latency_s": 0.01}


@pytest.mark.parametrize("schema,good,field,bad,expected", [
    (EXAMPLES, EXAMPLE, "dataset", "wiki", "isin"),
    (EXAMPLES, EXAMPLE, "documents", [], "at least one document"),
    (EXAMPLES, EXAMPLE, "history", [{"role": "bot", "content": "hi"}], "role: user|assistant"),
    (EXAMPLES, EXAMPLE, "answers", "y", "list of str"),
    (EXAMPLES, EXAMPLE, "question", " ", "non-empty"),
    (CANDIDATES, CANDIDATE, "sample_idx", -1, "greater_than_or_equal_to(0)"),
    (CANDIDATES, CANDIDATE, "finish_reason", "eos", "isin"),
    (JUDGED, JUDGED_ROW, "correct", 2, "isin"),
    (PREDICTIONS, PREDICTION, "em", 1.5, "in_range"),
    (PREDICTIONS, PREDICTION, "completion_tokens", -3, "greater_than_or_equal_to(0)"),
])
def test_bad_field_is_named_with_its_line(schema, good, field, bad, expected):
    rows = [dict(good, id="a"), dict(good, id="b", **{field: bad})]
    validate(rows[:1], schema, "f.jsonl")
    with pytest.raises(InputError) as e:
        validate(rows, schema, "data/f.jsonl")
    msg = str(e.value)
    assert msg.startswith("data/f.jsonl:") and "line 2" in msg and f"'{field}'" in msg and expected in msg, msg


def test_missing_and_unexpected_fields_are_named():
    row = {k: v for k, v in EXAMPLE.items() if k != "bridge"} | {"extra": 1}
    with pytest.raises(InputError, match="unexpected field 'extra'; missing field 'bridge'"):
        validate([row], EXAMPLES, "f.jsonl")


def test_row_level_checks_and_duplicates():
    with pytest.raises(InputError, match="line 1: gold_doc_idxs/helpful_doc_idxs must index into documents"):
        validate([dict(EXAMPLE, gold_doc_idxs=[3])], EXAMPLES, "f.jsonl")
    with pytest.raises(InputError, match="line 2: field 'id'"):
        validate([EXAMPLE, EXAMPLE], EXAMPLES, "f.jsonl")
    with pytest.raises(InputError, match="id"):
        validate([CANDIDATE, CANDIDATE], CANDIDATES, "f.jsonl")
