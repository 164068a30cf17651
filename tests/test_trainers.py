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
                                                             "lambda_upper": 0.5, "epsilon_frac": 1.0}},
                     save_steps=1)
    result = train_grpo(cfg, prompt_rows, str(policy), tmp_path / "out")
    logged = {k for h in result["history"] for k in h}
    assert {"loss", "reward", "rewards/length/mean", "rewards/correctness/mean", "completions/mean_length",
            "time/rollout_s", "time/rewards_s"} <= logged
    # save_steps: the weights every step (bench/grpo_curve.py evaluates them), without optimiser state.
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(d.name for d in checkpoints.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (checkpoints / "checkpoint-1" / "model.safetensors").exists()
    assert not (checkpoints / "checkpoint-1" / "optimizer.pt").exists()
    # A random policy's completions are long: the length reward is below its maximum.
    assert min(h["rewards/length/mean"] for h in result["history"] if "rewards/length/mean" in h) < 1.0
    assert _changed(_weights(policy), _weights(tmp_path / "out" / "model"))


def test_the_reward_trl_logs_is_the_weighted_sum_of_our_functions(tmp_path):
    """Two rewards recorded as the trainer calls them, weights 2.0 and 0.5: the reward TRL logs
    for the step is 2·mean(r_a) + 0.5·mean(r_b) of exactly those values."""
    from transformers import AutoTokenizer

    from steps.core import rewards, training
    from steps.core.rl import RLConfig, train_rl
    seen: dict[str, list[float]] = {"a": [], "b": []}

    def make_a():
        def a(completions, **_):
            out = [float(len(c) % 3) for c in completions]
            seen["a"] += out
            return out
        return a

    def make_b():
        def b(completions, policy_tokens=None, **_):
            out = [n / 10 for n in policy_tokens]
            seen["b"] += out
            return out
        return b

    rewards.REWARDS.update({"test_a": make_a, "test_b": make_b})
    try:
        rows = examples(2, 2)
        policy = tiny_model(tmp_path / "policy", TINY_DENSE, rows)
        prompt_rows = training.prompt_rows(rows, AutoTokenizer.from_pretrained(policy))
        cfg = RLConfig(rewards={"test_a": {"weight": 2.0}, "test_b": {"weight": 0.5}}, num_generations=4,
                       prompts_per_step=2, max_steps=1, max_completion_length=8, learning_rate=1e-3)
        result = train_rl(cfg, prompt_rows, str(policy), tmp_path / "out")
    finally:
        del rewards.REWARDS["test_a"], rewards.REWARDS["test_b"]
    logged = next(h for h in result["history"] if "reward" in h)
    assert len(seen["a"]) == len(seen["b"]) == 8
    expected = 2.0 * sum(seen["a"]) / 8 + 0.5 * sum(seen["b"]) / 8
    assert logged["reward"] == pytest.approx(expected, rel=1e-5)
    assert logged["rewards/test_a/mean"] == pytest.approx(sum(seen["a"]) / 8, rel=1e-5)


def test_rollout_func_hands_trl_the_ownership_mask_and_the_eos(tmp_path):
    """A rollout that marks inserted tokens: TRL gets them as env_mask 0 (no loss, not counted in
    the completion length), the rewards get the policy's own token count, and a finished
    completion ends with EOS (mask 1: the policy must learn to stop)."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.core import rollouts
    from steps.core.rl import RLConfig, rollout_func
    from steps.core.rollouts import RolloutCompletion

    class Inserting:
        chat_template_kwargs: dict = {}

        def __init__(self, backend, **_):
            pass

        def run(self, prompts, sampling, on_batch=None):
            return [[RolloutCompletion(text="a b c d", token_ids=(5, 6, 7, 8), mask=(1, 0, 0, 1), prompt_tokens=3,
                                       finish_reason="stop" if i % 2 else "length")] for i, _ in enumerate(prompts)]

        def close(self):
            pass

    rollouts.PROTOCOLS["test_inserting"] = Inserting
    try:
        rows = examples(1, 1)
        policy = tiny_model(tmp_path / "policy", TINY_DENSE, rows)
        tok = AutoTokenizer.from_pretrained(policy)
        model = AutoModelForCausalLM.from_pretrained(policy)
        from accelerate import Accelerator

        # The parts of a trainer the rollout reads; the model unwrapped for generation as TRL does.
        trainer = SimpleNamespace(processing_class=tok, model=model, model_wrapped=model,
                                  state=SimpleNamespace(global_step=0), accelerator=Accelerator(cpu=True),
                                  args=SimpleNamespace(ds3_gather_for_generation=True))
        cfg = RLConfig(rewards={"format": {}}, protocol="test_inserting")
        model.train()
        out = rollout_func(cfg)(["x y", "x z"], trainer)
        assert model.training  # generation ran in eval mode; training mode is back
    finally:
        del rollouts.PROTOCOLS["test_inserting"]
    assert out["completion_ids"] == [[5, 6, 7, 8], [5, 6, 7, 8, tok.eos_token_id]]
    assert out["env_mask"] == [[1, 0, 0, 1], [1, 0, 0, 1, 1]]
    assert out["policy_tokens"] == [2, 2] and out["external_tokens"] == [2, 2] and out["logprobs"] is None


def test_old_logprob_override_and_raw_advantages_reach_the_loss(tmp_path):
    """AdaptThink's hooks: the forced first token's old log-prob set to log 0.5 (the ratio then
    differs from 1 and the clip acts: TRL logs a clip ratio), and the raw reward as the advantage."""
    import math

    import torch
    from transformers import AutoTokenizer

    from steps.core import training
    from steps.core.rl import RLConfig, train_rl
    seen = []

    def override(batch):
        seen.append(batch["completion_ids"].shape)
        forced = torch.full(batch["completion_ids"].shape, float("nan"))
        forced[:, 0] = math.log(0.5)
        return forced

    from steps.core import rewards

    def make_negative():
        return lambda completions, policy_tokens=None, **_: [-1.0 - n / 10 for n in policy_tokens]

    rows = examples(2, 2)
    policy = tiny_model(tmp_path / "policy", TINY_DENSE, rows)
    prompt_rows = training.prompt_rows(rows, AutoTokenizer.from_pretrained(policy))
    rewards.REWARDS["test_negative"] = make_negative
    try:
        cfg = RLConfig(rewards={"test_negative": {}}, advantage="raw", num_generations=4, prompts_per_step=2,
                       max_steps=1, max_completion_length=6, learning_rate=1e-3, epsilon=0.2)
        result = train_rl(cfg, prompt_rows, str(policy), tmp_path / "out", old_logp_override=override)
    finally:
        del rewards.REWARDS["test_negative"]
    assert seen and seen[0][0] == 8
    logged = next(h for h in result["history"] if "loss" in h)
    # Raw advantages: every reward is below -1, so every advantage is negative (group-normalised
    # ones would average 0). The first token's ratio is p/0.5, and a random policy over a large
    # vocabulary gives p << 0.5: far below 1 - 0.2, so with negative advantages it is clipped.
    assert logged["clip_ratio/low_mean"] > 0, logged
    assert logged["loss"] != 0.0


def test_rollout_stats_are_per_step_means_with_missing_keys_counted_zero():
    """The train log's `rollout/<key>` columns: means over the step's completions of the numeric
    meta; a key a completion lacks counts 0 (a member it never called); dicts and text are left out."""
    from steps.core.rl import rollout_stats
    from steps.core.rollouts import RolloutCompletion

    def c(**meta):
        return RolloutCompletion(text="x", token_ids=(1,), mask=(1,), prompt_tokens=1, finish_reason="stop", meta=meta)

    outs = [c(calls=2, calls_teacher=2, cost=0.5, forced=True, reward_columns={"cost": 0.5}, why="a"),
            c(calls=0, cost=0.0, forced=False),
            c(calls=1, calls_rft=1, cost=0.1, forced=False)]
    assert rollout_stats(outs) == pytest.approx({
        "rollout/calls": 1.0,            # (2 + 0 + 1) / 3
        "rollout/calls_teacher": 2 / 3,  # only the first called the teacher
        "rollout/calls_rft": 1 / 3,
        "rollout/cost": 0.2,
        "rollout/forced": 1 / 3,         # a flag's mean is its share
    })
    assert rollout_stats([]) == {}
