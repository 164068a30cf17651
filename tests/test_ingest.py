import json

import pytest

from steps.core.io import InputError
from steps.ingest import IngestConfig, ingest, main, parse_ecommerce, parse_musique
from tests.helpers import examples


def test_synthetic_split_is_deterministic_and_mixed():
    cfg = IngestConfig(synthetic_musique_n=200, synthetic_ecommerce_n=100, max_eval_per_dataset=10)
    train, evals, raw, stats = ingest(cfg)
    again = ingest(cfg)
    assert (train, evals) == again[:2]
    assert stats["eval"] == {"ecommerce": 10, "musique": 10} and len(train) == 280
    assert not {e["id"] for e in train} & {e["id"] for e in evals}
    assert {e["dataset"] for e in train[:20]} == {"musique", "ecommerce"}  # any prefix mixes datasets
    assert set(raw) == {"musique_synthetic.jsonl", "ecommerce_synthetic.jsonl"}


def test_real_samples_load_as_is(shared_data):
    m, skipped = parse_musique([(i, json.loads(line)) for i, line in
                                enumerate((shared_data / "musique_dev_sample.jsonl").open(), 1)], "musique")
    assert len(m) == 200 and skipped == 0
    assert all(len(e["documents"]) == 20 and e["gold_doc_idxs"] and e["bridge"] for e in m)
    e = parse_ecommerce([(i, json.loads(line)) for i, line in
                         enumerate((shared_data / "epqa_dev_sample.jsonl").open(), 1)], "epqa")
    assert len(e) == 150 and all(x["documents"][0].startswith("product : ") for x in e)
    assert sum(bool(x["answers"]) for x in e) > 100


@pytest.mark.parametrize("mutate,expected", [
    (lambda r: r.pop("question"), "line 3: field 'question': expected a string, got 'nothing (missing)'"),
    (lambda r: r["paragraphs"][1].update(idx=7), "line 3: field 'paragraphs[1].idx': expected 1"),
    (lambda r: r["paragraphs"][0].update(paragraph_text=None), "line 3: field 'paragraphs[0].paragraph_text'"),
    (lambda r: r.update(answer_aliases="x"), "line 3: field 'answer_aliases': expected a list"),
])
def test_malformed_line_names_file_line_field_and_writes_nothing(tmp_path, mutate, expected):
    from steps.core import synth
    rows = synth.musique_rows(5, 0)
    mutate(rows[2])
    src = tmp_path / "musique.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  sources: [musique]\n  musique_path: {src}\n")
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        main(["--params", str(params), "--out", str(out)])
    assert str(e.value).startswith(f"{src}: ") and expected in str(e.value), str(e.value)
    assert not out.exists() or not any(out.rglob("*"))


def test_invalid_json_line_is_named(tmp_path):
    src = tmp_path / "e.jsonl"
    src.write_text('{"qid": 1, "question": "q", "documents": [{"text": "t"}]}\n{broken\n')
    params = tmp_path / "params.yaml"
    params.write_text(f"ingest:\n  sources: [ecommerce]\n  ecommerce_path: {src}\n")
    with pytest.raises(InputError, match=r"e.jsonl: line 2: invalid JSON"):
        main(["--params", str(params), "--out", str(tmp_path / "out")])


def test_history_strings_are_accepted_and_bad_roles_named():
    row = {"qid": "1", "question": "q ?", "dialogue_history": ["user: hi", "assistant: hello"],
           "documents": [{"text": "a doc", "label": 2}]}
    ex = parse_ecommerce([(1, row)], "f")[0]
    assert ex["history"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(InputError, match="line 1: field 'dialogue_history\\[0\\]'"):
        parse_ecommerce([(1, dict(row, dialogue_history=["bot: hi"]))], "f")
    assert examples(2, 2)


def test_atomic_outputs_get_the_mode_of_a_plain_open(tmp_path):
    """Outputs are renamed from a mkstemp file (0600); they must end with the umask's mode so
    that a team's shared volume or a container running as another user can read them."""
    import os

    from steps.core.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "out.json", {"a": 1})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
