import json

import pytest

from steps.core.io import InputError
from steps.ingest import IngestConfig, ingest, main, parse_ecommerce, parse_musique
from tests.helpers import examples


def test_synthetic_split_is_deterministic_and_mixed():
    cfg = IngestConfig(synthetic_musique_n=200, synthetic_ecommerce_n=100, max_eval_per_dataset=10)
    train, dev, evals, raw, stats = ingest(cfg)
    again = ingest(cfg)
    assert (train, dev, evals) == again[:3]
    assert stats["eval"] == {"ecommerce": 10, "musique": 10}
    assert 0 < len(dev) < 60 and len(train) == 300 - 20 - len(dev)
    ids = [{e["id"] for e in part} for part in (train, dev, evals)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # three disjoint splits
    assert {e["dataset"] for e in train[:20]} == {"musique", "ecommerce"}  # any prefix mixes datasets
    assert set(raw) == {"musique_synthetic.jsonl", "ecommerce_synthetic.jsonl"}
    # The dev split is taken from what was train: the eval split is the same with or without it.
    _, no_dev, evals_without_dev, _, _ = ingest(IngestConfig(synthetic_musique_n=200, synthetic_ecommerce_n=100,
                                                             max_eval_per_dataset=10, dev_fraction=0.0))
    assert no_dev == [] and evals_without_dev == evals


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
    params.write_text(f"base: {{seed: 0}}\ningest:\n  sources: [musique]\n  musique_path: {src}\n")
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        main(["--params", str(params), "--out", str(out)])
    assert str(e.value).startswith(f"{src}: ") and expected in str(e.value), str(e.value)
    assert not out.exists() or not any(out.rglob("*"))


def test_invalid_json_line_is_named(tmp_path):
    src = tmp_path / "e.jsonl"
    src.write_text('{"qid": 1, "question": "q", "documents": [{"text": "t"}]}\n{broken\n')
    params = tmp_path / "params.yaml"
    params.write_text(f"base: {{seed: 0}}\ningest:\n  sources: [ecommerce]\n  ecommerce_path: {src}\n")
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


# --- issue 11: sources that yield nothing, duplicate ids, answers in no paragraph -------------

def _run(tmp_path, sources: dict[str, list[dict] | str]):
    """ingest.main over files written from `sources` ({musique|ecommerce: rows or raw text})."""
    lines = ["base: {seed: 0}", "ingest:", f"  sources: [{', '.join(sources)}]", "  eval_fraction: 0.5",
             "  dev_fraction: 0.0"]
    for name, rows in sources.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text(rows if isinstance(rows, str) else "".join(json.dumps(r) + "\n" for r in rows))
        lines.append(f"  {name}_path: {path}")
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    main(["--params", str(tmp_path / "params.yaml"), "--out", str(out)])
    return out


def _musique(n: int = 4) -> list[dict]:
    from steps.core import synth
    return synth.musique_rows(n, 0)


def _ecommerce(n: int = 4) -> list[dict]:
    from steps.core import synth
    return synth.ecommerce_rows(n, 0)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_an_empty_source_file_is_an_error_naming_it(tmp_path, text):
    with pytest.raises(InputError) as e:
        _run(tmp_path, {"ecommerce": _ecommerce(), "musique": text})
    assert str(e.value).startswith(f"{tmp_path / 'musique.jsonl'}: no records (an empty file); ingest.sources "
                                   "names musique"), str(e.value)
    assert not (tmp_path / "out").exists()


def test_a_source_of_only_unanswerable_records_is_an_error(tmp_path):
    rows = [dict(r, answerable=False) for r in _musique(3)]
    with pytest.raises(InputError, match=r"musique.jsonl: 3 record\(s\) but no example \(all unanswerable\)"):
        _run(tmp_path, {"musique": rows})


def test_a_duplicate_id_in_one_file_names_both_lines(tmp_path):
    rows = _musique(5)
    rows[3]["id"] = rows[1]["id"]
    with pytest.raises(InputError) as e:
        _run(tmp_path, {"musique": rows})
    src = tmp_path / "musique.jsonl"
    assert str(e.value) == (f"duplicate example id(s): {rows[1]['id']!r} ({src}: line 2 and line 4): "
                            "ids must be unique"), str(e.value)
    assert "across" not in str(e.value) and not (tmp_path / "out").exists()


def test_a_duplicate_id_across_files_names_both_files_and_lines(tmp_path):
    musique, ecommerce = _musique(3), _ecommerce(3)
    ecommerce[2]["qid"] = musique[0]["id"]
    with pytest.raises(InputError) as e:
        _run(tmp_path, {"musique": musique, "ecommerce": ecommerce})
    assert (f"{musique[0]['id']!r} ({tmp_path / 'musique.jsonl'}: line 1 and {tmp_path / 'ecommerce.jsonl'}: "
            "line 3)") in str(e.value), str(e.value)


def test_an_answer_in_no_paragraph_is_counted_per_source_and_warned(tmp_path, caplog):
    rows = _musique(6)
    rows[2]["answer"], rows[2]["answer_aliases"] = "zanzibar", ["the zanzibar"]
    rows[4]["answer_aliases"] = [rows[4]["answer"]]
    rows[4]["answer"] = "nowhere to be found"  # an alias is in a paragraph: that counts as found
    with caplog.at_level("WARNING"):
        out = _run(tmp_path, {"musique": rows, "ecommerce": _ecommerce(2)})
    stats = json.loads((out / "stats.json").read_text())
    assert stats["sources"]["musique"] == {"path": str(tmp_path / "musique.jsonl"), "records": 6, "examples": 6,
                                           "skipped_unanswerable": 0, "answer_not_in_paragraphs": 1}
    assert stats["sources"]["ecommerce"]["examples"] == 2
    assert "musique.jsonl: 1 of 6 records have an answer that appears in no paragraph" in caplog.text


def test_a_dataset_without_eval_examples_is_an_error_naming_it(tmp_path):
    """Every later stage works per dataset; 2 examples with eval_fraction 0.1 leave eval empty."""
    src = tmp_path / "musique.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _musique(2)))
    (tmp_path / "params.yaml").write_text(f"base: {{seed: 0}}\ningest: {{sources: [musique], musique_path: {src}}}\n")
    with pytest.raises(InputError, match=rf"^ingest: dataset musique \({src}\): 2 example\(s\) split into 2 train "
                                         r"and 0 eval; each needs at least one"):
        main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qid", ["", "   "])
def test_an_empty_id_is_refused_at_its_line(qid):
    row = {"qid": qid, "question": "q ?", "documents": [{"text": "a doc", "label": 2}]}
    with pytest.raises(InputError, match=r"^f: line 7: field 'qid': expected a non-empty string"):
        parse_ecommerce([(7, row)], "f")


def test_synthetic_hop_mix_gives_consistent_chains_of_each_length():
    from collections import Counter

    from steps.core import synth
    rows = synth.musique_rows(400, 0, {1: 0.25, 2: 0.35, 3: 0.25, 4: 0.15})
    ex, _ = parse_musique(list(enumerate(rows, 1)), "synthetic")
    counts = Counter(e["hops"] for e in ex)
    assert set(counts) == {1, 2, 3, 4} and counts[2] > counts[4]  # roughly the asked shares
    for raw, e in zip(rows, ex):
        steps = raw["question_decomposition"]
        assert e["hops"] == len(steps) == int(raw["id"][0])  # the id carries the hop count, as MuSiQue's do
        assert steps[-1]["answer"] == raw["answer"] and e["bridge"] == [s["answer"] for s in steps[:-1]]
        # every hop is supported by its own document, which names the previous hop's answer
        for h, s in enumerate(steps):
            doc = raw["paragraphs"][s["paragraph_support_idx"]]["paragraph_text"]
            assert s["answer"] in doc.split() and (h == 0 or steps[h - 1]["answer"] in doc.split())
        assert len(raw["paragraphs"]) > len(steps)  # lures beside the supporting documents
    assert synth.musique_rows(50, 0) == synth.musique_rows(50, 0, {2: 1.0})  # default: 2-hop only
    with pytest.raises(ValueError, match="hop_mix"):
        synth.musique_rows(5, 0, {5: 1.0})


def test_hops_come_from_musique_ids_and_ecommerce_is_one_hop(shared_data):
    from collections import Counter
    m, _ = parse_musique([(i, json.loads(line)) for i, line in
                          enumerate((shared_data / "musique_dev_sample.jsonl").open(), 1)], "musique")
    by_prefix = Counter((e["id"].split("__")[0], e["hops"]) for e in m)
    assert all(int(prefix[0]) == hops for prefix, hops in by_prefix)  # 2hop -> 2, 3hop1 -> 3, 4hop3 -> 4
    assert {h for _, h in by_prefix} >= {2, 3, 4}
    e = parse_ecommerce([(i, json.loads(line)) for i, line in
                         enumerate((shared_data / "epqa_dev_sample.jsonl").open(), 1)], "epqa")
    assert {x["hops"] for x in e} == {1}
