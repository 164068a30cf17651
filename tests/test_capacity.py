"""bench/capacity.py: the plan follows the project's FLOPs convention and its stated assumptions."""
from __future__ import annotations

import dataclasses

import pytest

from bench.capacity import Plan, main, plan_rows, rollout_flops, serve_gpus, student_profile, zero3_gpus
from steps.core.modeling import decode_flops, prefill_flops


def _row(rows, prefix):
    return next(r for r in rows if r["stage"].startswith(prefix))


def test_flops_are_the_projects_convention():
    p = Plan()
    prof = student_profile(p)
    pre, dec = rollout_flops(p, 10, 2500, 1000)
    assert dec == 10 * decode_flops(prof, 2500, 1000) and pre == 10 * prefill_flops(prof, 2500)
    # Decode at the paper's scale: 2 x N_active per token dominates the attention term at 3.5k context.
    per_token = decode_flops(prof, 2500, 1000) / 1000
    assert 2 * p.student_active < per_token < 1.5 * 2 * p.student_active


def test_time_and_cost_scale_with_the_assumptions():
    base = plan_rows(Plan())
    faster = plan_rows(Plan(mfu_train=0.30))
    assert _row(faster, "rft")["hours"] == pytest.approx(_row(base, "rft")["hours"] / 2, rel=0.01)
    more = plan_rows(Plan(questions=80_000))
    assert _row(more, "sample")["usd"] == pytest.approx(2 * _row(base, "sample")["usd"], rel=0.01)
    grpo = _row(base, "grpo")
    # Server mode is synchronous: every GPU held for rollouts + updates.
    assert grpo["gpu_hours"] == pytest.approx(12 * grpo["hours"], rel=0.01)


def test_memory_decides_the_gpu_count():
    # 30.5B x 16 B of training state = 488 GB: 8 H100 hold it sharded (61 GB + activations), DDP could not.
    n, gb = zero3_gpus(Plan())
    assert n == 8 and gb < 80 * 0.9
    assert zero3_gpus(Plan(activation_gb_per_gpu=20.0))[0] == 16  # a node more when activations grow
    assert zero3_gpus(Plan(gpu="h200", activation_gb_per_gpu=20.0))[0] == 8
    assert serve_gpus(Plan(), 512, 3500)[0] == 4  # weights 61 GB + KV cache 176 GB
    with pytest.raises(ValueError, match="lower the batch"):
        serve_gpus(Plan(), 4096, 32_000)


def test_cli_sets_assumptions_by_name(capsys):
    assert main(["--set", "gpu=h200", "--set", "mfu_decode=0.05"]) == 0
    out = capsys.readouterr().out
    assert "x H200" in out and "| **total** |" in out
    with pytest.raises(SystemExit, match="key one of"):
        main(["--set", "mfu=0.3"])
    with pytest.raises(ValueError, match="mfu_train"):
        dataclasses.replace(Plan(), mfu_train=1.5)
