"""AdaptThink (steps/adaptthink.py): the forced halves of each group, the log 0.5 old log-prob of
the forced decision token, the reference accuracy join, and a training step."""
import math

import pytest

from tests.helpers import TINY_DENSE, examples, tiny_model


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    rows = examples(2, 2)
    return rows, tiny_model(tmp_path_factory.mktemp("adaptthink") / "policy", TINY_DENSE, rows)


def _rollout(policy_dir, opener="the"):
    from steps.core.backends import TransformersBackend
    from steps.core.rollouts import make_rollout

    backend = TransformersBackend(str(policy_dir), batch_size=16)
    opener_id = backend.tokenizer(opener, add_special_tokens=False)["input_ids"][0]
    return make_rollout("adaptthink", backend, thinking_opener_id=opener_id, nothinking_ratio=0.5), opener_id


def test_half_of_each_group_is_forced_to_nothinking_with_old_logprob_log_half(policy):
    """Two prompts, K = 4 copies each, interleaved as a batch may hold them: in each group two
    rollouts start `<think> </think>` (NoThinking) and two `<think> the` (thinking); `<think>`
    is the template's opener (mask 0), the decision token is the policy's (mask 1); the old
    log-prob the trainer uses for every decision token is log 0.5, and no other is touched."""
    import torch
    from transformers import AutoTokenizer

    from steps.adaptthink import make_old_logp_override
    from steps.core.backends import SamplingParams
    from steps.core.prompts import Prompt
    from steps.core.rollouts.hybrid import marker_ids
    from steps.core.training import prompt_rows

    rows, policy_dir = policy
    tok = AutoTokenizer.from_pretrained(policy_dir)
    texts = [r["prompt"] for r in prompt_rows(rows[:2], tok)]
    batch = [texts[0], texts[1], texts[0], texts[0], texts[1], texts[1], texts[0], texts[1]]
    rollout, opener_id = _rollout(policy_dir)
    outs = rollout.run([Prompt((), t, key=f"0/{i}") for i, t in enumerate(batch)],
                       SamplingParams(n=1, temperature=1.0, max_new_tokens=8, seed=3))
    comps = [cs[0] for cs in outs]
    open_id, close_id = marker_ids(tok)
    for text in texts:
        group = [c for t, c in zip(batch, comps) if t == text]
        forced = [c.meta["forced_nothinking"] for c in group]
        assert sorted(forced) == [False, False, True, True]
        for c in group:
            decision = close_id if c.meta["forced_nothinking"] else opener_id
            assert c.token_ids[:2] == (open_id, decision)
            assert c.mask[:2] == (0, 1) and set(c.mask[2:]) <= {1}
            assert c.meta["reward_columns"] == {"forced_nothinking": c.meta["forced_nothinking"]}
            assert c.text.startswith("<think> </think>" if c.meta["forced_nothinking"] else "<think> the")
    # The trainer's batch: completions right-padded; the override gives log 0.5 at the decision.
    width = max(len(c.token_ids) for c in comps)
    ids = torch.tensor([list(c.token_ids) + [tok.pad_token_id] * (width - len(c.token_ids)) for c in comps])
    old = make_old_logp_override(open_id)({"completion_ids": ids})
    assert old.shape == ids.shape
    assert torch.allclose(old[:, 1], torch.full((8,), math.log(0.5)))
    assert torch.isnan(old[:, 0]).all() and torch.isnan(old[:, 2:]).all()


def test_an_r1_style_prompt_forces_the_first_completion_token():
    """A template that ends the prompt with <think>: the decision is the first completion token."""
    import torch

    from steps.adaptthink import make_old_logp_override
    from steps.core.rollouts.hybrid import decision_index

    assert decision_index([7, 8, 9], open_id=5, prompt_opened=True) == 0
    assert decision_index([5, 8, 9], open_id=5) == 1
    assert decision_index([8, 9], open_id=5) is None
    old = make_old_logp_override(5)({"completion_ids": torch.tensor([[6, 1, 2], [5, 6, 2]])})
    assert old[0, 0] == pytest.approx(math.log(0.5)) and old[1, 1] == pytest.approx(math.log(0.5))
    assert int(torch.isnan(old).sum()) == 4


def test_the_stats_read_the_policys_own_nothinking_probability_per_hop_count():
    """The forcing hides the policy's own choice; its log-probs before the override do not. Four
    completions `<think> D ...` (open 5, close 6, opener 7): two NoThinking (D = 6) with own
    p(</think>) 0.1 (1 hop) and 0.3 (3 hops), two thinking (D = 7) whose p is not a NoThinking
    probability and is left out; a batch without NoThinking logs nothing."""
    import torch

    from steps.adaptthink import make_old_logp_override

    ids = torch.tensor([[5, 6, 2], [5, 7, 2], [5, 6, 2], [5, 7, 2]])
    own = torch.log(torch.tensor([[0.9, 0.1, 0.5], [0.9, 0.8, 0.5], [0.9, 0.3, 0.5], [0.9, 0.6, 0.5]]))
    inputs = [{"hops": 1}, {"hops": 1}, {"hops": 3}, {"hops": 3}]
    override = make_old_logp_override(5, close_id=6)
    assert override.stats(inputs, {"completion_ids": ids}, own) == pytest.approx({
        "rollout/p_nothinking": 0.2,            # mean of 0.1 and 0.3
        "rollout/p_nothinking_hops_1": 0.1,
        "rollout/p_nothinking_hops_3": 0.3})
    # rows without hops (e-commerce): the overall figure only
    assert override.stats([{}, {}, {}, {}], {"completion_ids": ids}, own) == pytest.approx({"rollout/p_nothinking": 0.2})
    assert override.stats(inputs, {"completion_ids": ids[[1, 3]]}, own[[1, 3]]) == {}
    assert not hasattr(make_old_logp_override(5), "stats")  # without close_id: no stats


@pytest.mark.parametrize("k,expected", [(2, [True, False]), (4, [True, True, False, False]),
                                        (8, [True] * 4 + [False] * 4)])
def test_the_forced_share_is_per_group(k, expected):
    from steps.core.prompts import Prompt
    from steps.core.rollouts.hybrid import forced_nothinking

    assert forced_nothinking([Prompt((), "p", key=str(i)) for i in range(k)], 0.5) == expected


def test_a_prompt_without_ref_accuracy_stops_the_stage_naming_it():
    from steps.adaptthink import attach_ref_accuracy
    from steps.core.io import InputError

    rows = [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"}]
    assert [r["ref_accuracy"] for r in attach_ref_accuracy(rows, [{"id": "a", "ref_accuracy": 0.5},
                                                                  {"id": "b", "ref_accuracy": 1}], "ref.jsonl")] == [0.5, 1.0]
    with pytest.raises(InputError, match=r"ref.jsonl: prompt 'b' has no ref_accuracy \(got None\)"):
        attach_ref_accuracy(rows, [{"id": "a", "ref_accuracy": 0.5}], "ref.jsonl")
    with pytest.raises(InputError, match=r"prompt 'a' has no ref_accuracy \(got None\)"):
        attach_ref_accuracy(rows, [{"id": "a", "ref_accuracy": None}, {"id": "b", "ref_accuracy": 0.0}], "ref.jsonl")


def test_the_config_needs_both_halves_and_the_reward():
    from steps.adaptthink import AdaptThinkConfig

    cfg = AdaptThinkConfig()
    assert cfg.advantage == "raw" and cfg.beta == 0.0 and cfg.epsilon == 0.2 and cfg.importance_sampling_level == "sequence"
    with pytest.raises(ValueError, match="adaptthink reward"):
        AdaptThinkConfig(rewards={"correctness": {}})
    with pytest.raises(ValueError, match="raise num_generations"):
        AdaptThinkConfig(num_generations=2, nothinking_ratio=0.2)


def test_reference_pass_and_one_training_step(policy, tmp_path):
    """The reference pass gives every prompt a ref_accuracy in [0, 1]; a
    training step runs the forced rollout and the reward sees `forced_nothinking`. With every
    ref_accuracy set to 1 an untrained model's rewards are all negative (acc 0: -1, or -0.95 when
    forced to NoThinking), and the decision token's ratio p / 0.5 is far below 1 - 0.2 (p is
    about 1 / vocabulary): the clip acts on it (TRL's low clip ratio)."""
    from transformers import AutoTokenizer

    from steps.adaptthink import AdaptThinkConfig, attach_ref_accuracy, choose_opener, reference_pass, train_adaptthink
    from steps.core.training import prompt_rows

    rows, policy_dir = policy
    tok = AutoTokenizer.from_pretrained(policy_dir)
    prows = prompt_rows(rows, tok)
    cfg = AdaptThinkConfig(ref_samples=2, num_generations=4, prompts_per_step=2, max_steps=1,
                           max_completion_length=8, learning_rate=1e-3, thinking_opener="the",
                           importance_sampling_level="token")
    ref = reference_pass(str(policy_dir), prows, cfg)
    assert [r["id"] for r in ref] == [r["id"] for r in prows]
    assert all(0.0 <= r["ref_accuracy"] <= 1.0 for r in ref)
    prows = attach_ref_accuracy(prows, [{**r, "ref_accuracy": 1.0} for r in ref], "ref")
    result = train_adaptthink(cfg, prows, str(policy_dir), tmp_path / "out", choose_opener(cfg, str(policy_dir), []))
    logged = next(h for h in result["history"] if "loss" in h)
    # half of 8 rollouts forced to NoThinking: mean reward -1 + 0.05 / 2 exactly
    assert logged["rewards/adaptthink/mean"] == pytest.approx(-1 + 0.025)
    assert logged["clip_ratio/low_mean"] > 0
    assert (tmp_path / "out" / "model" / "model.safetensors").exists()


def test_the_opener_is_the_policys_likeliest_first_thinking_token(policy):
    from dataclasses import replace

    from transformers import AutoTokenizer

    from steps.adaptthink import AdaptThinkConfig, choose_opener
    from steps.core.rollouts.hybrid import marker_ids
    from steps.core.training import prompt_rows

    rows, policy_dir = policy
    tok = AutoTokenizer.from_pretrained(policy_dir)
    prompts = [r["prompt"] for r in prompt_rows(rows, tok)]
    chosen = choose_opener(AdaptThinkConfig(), str(policy_dir), prompts)
    assert chosen not in (*marker_ids(tok), *tok.all_special_ids)
    assert choose_opener(replace(AdaptThinkConfig(), thinking_opener="the"), str(policy_dir), prompts) == \
        tok("the", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(ValueError, match="must be one"):
        choose_opener(replace(AdaptThinkConfig(), thinking_opener="the answer"), str(policy_dir), prompts)
