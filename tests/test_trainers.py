"""Trainer smoke tests: the loss is logged and the parameters change (dense and MoE)."""
import pytest

from tests.helpers import TINY_DENSE, TINY_MOE, examples, tiny_model


def _weights(path):
    from safetensors.torch import load_file
    return load_file(str(path / "model.safetensors"))


def _changed(before, after):
    return [k for k in before if not (before[k] == after[k]).all()]


@pytest.mark.parametrize("arch", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_rft_trains_and_logs_loss(tmp_path, arch):
    from transformers import AutoTokenizer

    from steps.rft import RftConfig, sft_rows, train_sft
    rows = examples(4, 4)
    base = tiny_model(tmp_path / "base", arch, rows)
    kept = [{"id": r["id"], "completion": f"<think> {r['documents'][0]} </think> {r['question']}"} for r in rows]
    cfg = RftConfig(max_steps=4, batch_size=4, learning_rate=1e-2, lambda_aux=0.05)
    result = train_sft(cfg, sft_rows(rows, kept, AutoTokenizer.from_pretrained(base), {}), str(base), tmp_path / "out")
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    assert losses and all(x > 0 for x in losses)
    if arch is TINY_MOE:
        # L_total = L_SFT + lambda_aux * L_aux: the router loss is computed and logged.
        assert result["metrics"]["moe"] and result["metrics"]["final_aux_loss"] > 0
    else:
        assert not result["metrics"]["moe"]
    before, after = _weights(base), _weights(tmp_path / "out" / "model")
    assert _changed(before, after)


@pytest.mark.parametrize("arch", [TINY_DENSE, TINY_MOE], ids=["dense", "moe"])
def test_grpo_trains_with_the_composite_reward(tmp_path, arch):
    from transformers import AutoTokenizer

    from steps.core import training
    from steps.grpo import GrpoConfig, train_grpo
    rows = examples(4, 4)
    policy = tiny_model(tmp_path / "policy", arch, rows)
    prompt_rows = training.prompt_rows(rows, AutoTokenizer.from_pretrained(policy))
    for r in prompt_rows:
        r["ref_length"] = 10.0
    cfg = GrpoConfig(num_generations=4, prompts_per_step=2, max_steps=2, max_completion_length=12,
                     learning_rate=1e-2, rewards={"correctness": {"weight": 1.0}, "helpfulness": {"weight": 1.0},
                                                  "length": {"weight": 1.0, "lambda_lower": 0.0,
                                                             "lambda_upper": 0.5, "epsilon_frac": 1.0}})
    result = train_grpo(cfg, prompt_rows, str(policy), tmp_path / "out")
    logged = {k for h in result["history"] for k in h}
    assert {"loss", "reward", "rewards/length/mean", "rewards/correctness/mean", "completions/mean_length"} <= logged
    # A random policy's completions are long: the length reward is below its maximum.
    assert min(h["rewards/length/mean"] for h in result["history"] if "rewards/length/mean" in h) < 1.0
    assert _changed(_weights(policy), _weights(tmp_path / "out" / "model"))
