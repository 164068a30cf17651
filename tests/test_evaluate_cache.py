"""The evaluation cache: keyed on what a prediction depends on, and a hit generates nothing."""
import shutil

import pytest

from steps.evaluate import EvaluateConfig, cache_key, run
from tests.helpers import TINY_DENSE, examples, tiny_model


@pytest.fixture(scope="module")
def rows():
    return examples(3, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, rows):
    path = tiny_model(tmp_path_factory.mktemp("m") / "dense", TINY_DENSE, rows)
    (path / "meta.json").write_text('{"created_unix": 1}')
    return path


def test_key_follows_content_not_path_or_lineage(rows, model_dir, tmp_path):
    cfg = EvaluateConfig(max_new_tokens=6)
    key = cache_key(cfg, model_dir, rows)
    copy = shutil.copytree(model_dir, tmp_path / "elsewhere")
    assert cache_key(cfg, copy, rows) == key
    (copy / "meta.json").write_text('{"created_unix": 2}')
    assert cache_key(cfg, copy, rows) == key
    assert cache_key(EvaluateConfig(max_new_tokens=6, latency_probe_n=1), copy, rows) == key

    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert cache_key(cfg, copy, rows) != key
    assert cache_key(EvaluateConfig(max_new_tokens=7), model_dir, rows) != key
    assert cache_key(cfg, model_dir, rows[:-1]) != key


def test_a_hit_generates_nothing_and_returns_the_same_predictions(rows, model_dir, tmp_path):
    cfg = EvaluateConfig(max_new_tokens=6, latency_probe_n=1, backend_options={"batch_size": 8})
    cache = tmp_path / "cache"
    models = {"teacher": str(model_dir), "rft": str(model_dir)}
    first, _, hits, _ = run(cfg, models, rows, tmp_path / "w1", cache)
    # The same weights under a second name are already a hit within the first run.
    assert hits == {"rft"} and len(list(cache.glob("*.jsonl"))) == 1
    second, latency, hits, _ = run(cfg, models, rows, tmp_path / "w2", cache)
    assert hits == {"teacher", "rft"}
    assert second == first
    assert not list((tmp_path / "w2").glob("part-*.jsonl"))  # nothing generated
    assert set(latency["teacher"]) == {"musique", "ecommerce"}  # the latency probe still ran
