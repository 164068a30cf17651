"""The share of datasets in sampling (`sample.max_examples_per_dataset`): which examples are
sampled, in file order, and the checks that keep a misspelt name or a bad count from sampling the wrong share unseen."""
import pytest

from steps.sample import SampleConfig, select_examples

# File order, as ingest writes it: the datasets interleaved.
ROWS = [{"id": f"{d}{i}", "dataset": d} for i, d in enumerate("mmemmemmem")]


def ids(rows):
    return [r["id"] for r in rows]


@pytest.mark.parametrize("max_examples, caps, expected", [
    # No caps: the first max_examples, as before the option existed.
    (4, {}, ["m0", "m1", "e2", "m3"]),
    (None, {}, ids(ROWS)),
    # A cap skips that dataset's later rows and keeps filling the total from the others.
    (4, {"m": 2}, ["m0", "m1", "e2", "e5"]),
    # Caps on both: each dataset's first N, the total unreached.
    (None, {"m": 3, "e": 1}, ["m0", "m1", "e2", "m3"]),
    # Both caps and the total: the total stops first.
    (3, {"m": 5, "e": 3}, ["m0", "m1", "e2"]),
    # 0 leaves a dataset out.
    (None, {"e": 0}, ["m0", "m1", "m3", "m4", "m6", "m7", "m9"]),
])
def test_each_dataset_gets_its_first_n_examples_in_file_order(max_examples, caps, expected):
    assert ids(select_examples(ROWS, max_examples, caps)) == expected


def test_a_cap_on_a_dataset_the_input_lacks_is_named_in_a_warning_with_the_names_it_has(caplog):
    """A warning, not a refusal: the default params cap both datasets, and a run whose ingest
    reads one source must still sample it; a misspelt name is still seen."""
    assert ids(select_examples(ROWS, 2, {"musqiue": 3})) == ["m0", "m1"]
    assert "['musqiue'], not among the input's datasets ['e', 'm']" in caplog.text


@pytest.mark.parametrize("cap", [-1, 1.5, "10", True])
def test_a_cap_that_is_not_a_count_is_refused_by_the_config(cap):
    with pytest.raises(ValueError, match="max_examples_per_dataset.m: expected a count"):
        SampleConfig(max_examples_per_dataset={"m": cap})
