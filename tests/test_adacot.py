"""AdaCoT (steps/adacot.py): Selective Loss Masking leaves the decision token without gradient;
the rollout masks exactly that token; both phases train."""
import pytest

from tests.helpers import TINY_DENSE, examples, tiny_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    rows = examples(2, 2)
    return rows, tiny_model(tmp_path_factory.mktemp("adacot") / "policy", TINY_DENSE, rows)


def test_the_rollout_masks_the_decision_token_only_when_asked(policy):
    from transformers import AutoTokenizer

    from steps.core.backends import SamplingParams, TransformersBackend
    from steps.core.prompts import Prompt, split_completion
    from steps.core.rollouts import RolloutCompletion, make_rollout
    from steps.core.rollouts.hybrid import marker_ids
    from steps.core.training import prompt_rows

    rows, policy_dir = policy
    tok = AutoTokenizer.from_pretrained(policy_dir)
    open_id, close_id = marker_ids(tok)
    backend = TransformersBackend(str(policy_dir), batch_size=8)
    masked = make_rollout("adacot", backend, mask_decision=True)
    # `<think> </think> x`: the decision is the second token, and only it is masked.
    c = RolloutCompletion(text="", token_ids=(open_id, close_id, 9), mask=(1, 1, 1), prompt_tokens=3, finish_reason="stop")
    assert masked.masked(c, prompt_opened=False).mask == (1, 0, 1)
    assert masked.masked(c, prompt_opened=True).mask == (0, 1, 1)     # R1-style: the first token decides
    no_opener = RolloutCompletion(text="", token_ids=(9, 9), mask=(1, 1), prompt_tokens=3, finish_reason="stop")
    assert masked.masked(no_opener, prompt_opened=False).mask == (1, 1)  # no decision was made: nothing masked
    prompts = [Prompt((), r["prompt"], key=str(i)) for i, r in enumerate(prompt_rows(rows, tok))]
    for cs in masked.run(prompts, SamplingParams(n=1, temperature=1.0, max_new_tokens=6, seed=1)):
        got = cs[0]
        expected = [1] * len(got.token_ids)
        if len(got.token_ids) >= 2 and got.token_ids[0] == open_id:
            expected[1] = 0
        assert list(got.mask) == expected
        # whether the policy thought, for the train log's think ratio (rollout/thinks)
        assert got.meta["thinks"] == bool(split_completion(got.text)[0])
    plain = make_rollout("adacot", TransformersBackend(str(policy_dir), batch_size=8), mask_decision=False)
    assert all(set(cs[0].mask) <= {1} for cs in plain.run(prompts, SamplingParams(n=1, max_new_tokens=6, seed=1)))


def test_selective_loss_masking_gives_the_decision_token_no_gradient(policy, tmp_path):
    """TRL's GRPO loss through our trainer class, on two identical completions `<think> </think>
    ...`, one with the decision token masked (the adacot rollout's mask, TRL's tool_mask): the
    gradient of the loss with respect to the final hidden state that chooses that token (TRL's
    fused head turns it into that token's log-prob and nothing else) is exactly zero for the
    masked row and not for the other; the rest of the masked row still gets its gradient."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig

    from steps.core.rl import make_trainer_class
    from steps.core.rollouts.hybrid import marker_ids

    rows, policy_dir = policy
    tok = AutoTokenizer.from_pretrained(policy_dir)
    open_id, close_id = marker_ids(tok)
    args = GRPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=8, report_to=[], use_cpu=True, logging_steps=1, loss_type="grpo")
    trainer = make_trainer_class("group", None)(
        model=str(policy_dir), reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=args,
        train_dataset=Dataset.from_list([{"prompt": "x"}] * 2), processing_class=tok)
    model = trainer.model
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test skips
    prompt = tok("documents : x question : y <assistant>", add_special_tokens=False)["input_ids"]
    completion = [open_id, close_id] + tok("the answer is x .", add_special_tokens=False)["input_ids"]
    P, T = len(prompt), len(completion)
    tool_mask = torch.ones(2, T, dtype=torch.long)
    tool_mask[0, 1] = 0  # row 0: the decision token masked (Selective Loss Masking)
    inputs = {"prompt_ids": torch.tensor([prompt] * 2), "prompt_mask": torch.ones(2, P, dtype=torch.long),
              "completion_ids": torch.tensor([completion] * 2), "completion_mask": torch.ones(2, T, dtype=torch.long),
              "tool_mask": tool_mask, "advantages": torch.tensor([1.0, 1.0]),
              "num_items_in_batch": torch.tensor(2 * T)}
    captured = {}

    def keep(_module, _inp, output):
        output.retain_grad()
        captured["hidden"] = output

    handle = model.model.norm.register_forward_hook(keep)
    try:
        model.train()
        trainer._compute_loss(model, inputs).backward()
    finally:
        handle.remove()
    grad = captured["hidden"].grad  # (2, P + T, H): position p predicts token p + 1
    decides = P + 1 - 1  # the position that chooses completion token 1 (the decision)
    assert torch.count_nonzero(grad[0, decides]) == 0
    assert torch.count_nonzero(grad[1, decides]) > 0
    assert torch.count_nonzero(grad[0, P + 2 - 1]) > 0  # the next token of the masked row still learns


def test_both_phases_train_and_the_slm_phase_takes_the_prompts_needing_a_cot(policy, tmp_path):
    from transformers import AutoTokenizer

    from steps.adacot import AdacotConfig, needing_cot, train_adacot
    from steps.core.training import prompt_rows

    rows, policy_dir = policy
    prows = prompt_rows([{**r, "hops": h} for r, h in zip(rows, [1, 3, 2, None])],
                        AutoTokenizer.from_pretrained(policy_dir))
    assert [r["hops"] for r in needing_cot(prows, 2)] == [3, 2]
    cfg = AdacotConfig(slm_steps=1, max_steps=1, num_generations=2, prompts_per_step=2, max_completion_length=6,
                       learning_rate=1e-3)
    result = train_adacot(cfg, prows, str(policy_dir), tmp_path / "out")
    assert result["metrics"]["slm_prompts"] == 2 and result["metrics"]["labelled_prompts"] == 3
    assert any("rewards/correctness/mean" in h for h in result["slm_history"])
    assert not any("rewards/adacot_trigger/mean" in h for h in result["slm_history"])
    assert any("rewards/adacot_trigger/mean" in h for h in result["history"])
    assert (tmp_path / "out" / "model" / "model.safetensors").exists() and not (tmp_path / "out" / "slm").exists()


def test_the_slm_phase_without_labels_says_what_is_missing(policy, tmp_path):
    from steps.adacot import AdacotConfig, train_adacot

    rows, policy_dir = policy
    with pytest.raises(ValueError, match="hops >= 2"):
        # rows without a hop count (real data that carries none) or none that needs a CoT
        unlabelled = [{**{k: v for k, v in r.items() if k != "hops"}, "prompt": "x"} for r in rows]
        train_adacot(AdacotConfig(slm_steps=1), unlabelled, str(policy_dir), tmp_path)
    with pytest.raises(ValueError, match="hops >= 2"):
        train_adacot(AdacotConfig(slm_steps=1), [{**r, "hops": 1, "prompt": "x"} for r in rows], str(policy_dir),
                     tmp_path)


def test_the_config_needs_the_trigger_penalties():
    from steps.adacot import AdacotConfig

    with pytest.raises(ValueError, match="adacot_trigger"):
        AdacotConfig(rewards={"correctness": {}})
    with pytest.raises(ValueError, match="slm_rewards.nope"):
        AdacotConfig(slm_rewards={"nope": {}})
    assert AdacotConfig().min_hops == 2
