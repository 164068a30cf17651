"""bench/merge_curve.py: weight interpolation between two models of one architecture."""
from __future__ import annotations

import pytest
import torch

from bench.merge_curve import interpolate, relative_tokens, write_merged
from tests.helpers import TINY_MOE, examples, tiny_model

A = {"w": torch.tensor([0.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.bfloat16), "n": torch.tensor([3])}
B = {"w": torch.tensor([4.0, -2.0]), "h": torch.tensor([3.0], dtype=torch.bfloat16), "n": torch.tensor([7])}


@pytest.mark.parametrize("alpha, w, h, n", [
    (0.0, [0.0, 2.0], 1.0, 7),    # alpha 0: the start model's weights; an integer buffer is always the end's
    (1.0, [4.0, -2.0], 3.0, 7),   # alpha 1: the end model's
    (0.5, [2.0, 0.0], 2.0, 7),    # the midpoint, elementwise
    (0.25, [1.0, 1.0], 1.5, 7),   # a quarter of the way: 0.75 * start + 0.25 * end
])
def test_interpolate_is_the_weighted_mean_of_floating_tensors(alpha, w, h, n):
    got = interpolate(A, B, alpha)
    assert got["w"].tolist() == w
    assert got["h"].dtype == torch.bfloat16 and got["h"].item() == h  # computed in float32, cast back
    assert got["n"].tolist() == [n]


@pytest.mark.parametrize("start, alpha, message", [
    ({"w": A["w"]}, 0.5, "different tensors"),                              # a tensor missing
    ({**A, "w": torch.zeros(3)}, 0.5, r"w: shape \(3,\) against \(2,\)"),   # another shape
    (A, 1.5, "between 0"),                                                  # extrapolation refused
])
def test_interpolate_refuses_what_is_not_one_architecture(start, alpha, message):
    with pytest.raises(ValueError, match=message):
        interpolate(start, B, alpha)


def test_the_merged_directory_loads_as_a_model_with_the_interpolated_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    rows = examples()
    start = tiny_model(tmp_path / "start", TINY_MOE, rows, seed=0)
    end = tiny_model(tmp_path / "end", TINY_MOE, rows, seed=1)
    out = write_merged(start, end, 0.25, tmp_path / "merged")
    assert not (tmp_path / "merged.tmp").exists()
    assert (out / "tokenizer.json").exists()
    models = [AutoModelForCausalLM.from_pretrained(d) for d in (start, end, out)]
    sa, sb, sm = (dict(m.named_parameters()) for m in models)
    for name in sm:
        torch.testing.assert_close(sm[name], 0.75 * sa[name] + 0.25 * sb[name])


def test_tokens_are_relative_to_each_pairs_own_rft_point():
    def point(pair, alpha, tokens):
        return {"pair": pair, "alpha": alpha, "figures": {"ecommerce": {"tokens_per_response": tokens}}}

    got = relative_tokens([point(0, 0.0, 100.0), point(0, 1.0, 40.0), point(1, 0.0, 50.0), point(1, 1.0, 40.0)])
    assert [p["tokens_vs_rft"]["ecommerce"] for p in got] == [1.0, 0.4, 1.0, 0.8]
