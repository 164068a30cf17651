import pytest

import json
import subprocess
import sys

from steps.core.rewards import COLUMNS, REWARDS, check_spec, make_rewards
from steps.core.rewards.dler import make_truncated_correctness
from steps.core.rewards.livethinking import SharedVerdicts, length_reward, make_format, make_length


# L_ref = 100, lambda_lower = 0.2, lambda_upper = 0.5 -> band [20, 50]; epsilon = 10 tokens.
#   length | d  | r_length = max(0, 1 - d/eps)
#   ------ | -- | ---------
#      0   | 20 | 0.0      far below the band
#     10   | 10 | 0.0      exactly epsilon below: reaches 0
#     15   |  5 | 0.5
#     20   |  0 | 1.0      lower boundary is inside
#     35   |  0 | 1.0
#     50   |  0 | 1.0      upper boundary is inside
#     55   |  5 | 0.5
#     60   | 10 | 0.0      exactly epsilon above
#    200   |150 | 0.0      clipped at 0, never negative
@pytest.mark.parametrize("length,expected", [
    (0, 0.0), (10, 0.0), (15, 0.5), (20, 1.0), (35, 1.0), (50, 1.0), (55, 0.5), (60, 0.0), (200, 0.0)])
def test_length_reward_table(length, expected):
    assert length_reward(length, 100, 0.2, 0.5, 10) == pytest.approx(expected)


def test_length_reward_rejects_nonpositive_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        length_reward(10, 100, 0.2, 0.5, 0)


def test_length_reward_function_uses_token_ids_and_ref_length():
    fn = make_length(lambda_lower=0.0, lambda_upper=0.5, epsilon_frac=0.5)
    # ref 40 -> band [0, 20], epsilon 20: 10 tokens -> 1, 30 tokens -> 0.5, 40 tokens -> 0
    out = fn(["a", "b", "c"], completion_ids=[[1] * 10, [1] * 30, [1] * 40], ref_length=[40, 40, 40])
    assert out == [1.0, 0.5, 0.0]


def test_length_reward_without_ref_length_says_what_is_missing():
    with pytest.raises(KeyError, match="ref_length"):
        make_length()(["a"], completion_ids=[[1]])


def test_length_reward_counts_only_the_policys_tokens():
    # 30 completion tokens of which 20 were inserted by another model: the policy wrote 10.
    fn = make_length(lambda_lower=0.0, lambda_upper=0.5, epsilon_frac=0.5)
    assert fn(["a"], completion_ids=[[1] * 30], policy_tokens=[10], ref_length=[40]) == [1.0]


def test_length_reward_refuses_word_counts():
    with pytest.raises(KeyError, match="token counts"):
        make_length()(["a b c"], ref_length=[10])


# Nested options are checked against the factory's signature, naming the full key path.
@pytest.mark.parametrize("spec,message", [
    ({"length": {"lamda_lower": 0.9}}, r"grpo.rewards.length.lamda_lower: unknown option"),
    ({"correctness": {"weight": "two"}}, r"grpo.rewards.correctness.weight: expected a number, got 'two'"),
    ({"length": {"epsilon_frac": "wide"}}, r"grpo.rewards.length.epsilon_frac: expected a number"),
    ({"nope": {}}, r"grpo.rewards.nope: reward 'nope' is not registered"),
    ({"grounding": {"framing": "yes"}}, r"grpo.rewards.grounding.framing: expected true or false, got 'yes'"),
])
def test_reward_spec_errors_name_the_key_path(spec, message):
    with pytest.raises(ValueError, match=message):
        check_spec(spec, "grpo.rewards")


def test_correctness_and_helpfulness_share_one_verdict_per_completion(musique_example):
    """An LLM judge costs a request per verdict: correctness and helpfulness ask it once."""
    from steps.core import judges

    class CountingJudge(judges.RuleJudge):
        calls = 0

        def judge(self, examples, responses):
            CountingJudge.calls += len(responses)
            return super().judge(examples, responses)

    judges.JUDGES["counting"] = f"{__name__}:CountingJudge"
    globals()["CountingJudge"] = CountingJudge
    try:
        fns, _ = make_rewards({"correctness": {"judge": "counting"}, "helpfulness": {"judge": "counting"}})
        cols = {k: [v, v] for k, v in musique_example.items()}
        completions = ["<think> x </think> the answer is kestria . zono was born in dadada .", "<think> y </think> no ."]
        assert [f(completions, **cols) for f in fns] == [[1.0, 0.0], [1.0, 0.0]]
        assert CountingJudge.calls == 2
    finally:
        del judges.JUDGES["counting"]
        SharedVerdicts._judges.clear()


# DLER's truncation penalty, max_tokens = 10: the reward is correctness within the target, 0 beyond.
#   policy tokens | correct | reward
#        5        |   yes   |  1.0
#       10        |   yes   |  1.0     the target itself is allowed
#       11        |   yes   |  0.0     one token over: truncated
#        5        |   no    |  0.0
@pytest.mark.parametrize("tokens,answer,expected", [(5, "kestria", 1.0), (10, "kestria", 1.0), (11, "kestria", 0.0),
                                                     (5, "sarnia", 0.0)])
def test_truncated_correctness_table(musique_example, tokens, answer, expected):
    fn = make_truncated_correctness(max_tokens=10)
    cols = {k: [v] for k, v in musique_example.items()}
    assert fn([f"<think> a </think> the answer is {answer} ."], policy_tokens=[tokens], **cols) == [expected]


def test_every_registered_reward_runs_from_the_command_line(tmp_path, musique_example):
    rows = [{**musique_example, "completion": "<think> zono was born in dadada . </think> the answer is kestria .",
             "ref_length": 20, "completion_ids": [1] * 8, "group": 0},
            {**musique_example, "id": "2hop__2", "completion": "the answer is sarnia .", "ref_length": 20,
             "completion_ids": [1] * 30, "group": 1}]
    # the columns that methods' stages add (each reward module's COLUMNS)
    rows = [{**r, **COLUMNS} for r in rows]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {"correctness": [1.0, 0.0], "length": [1.0, 0.0], "truncated_correctness": [1.0, 0.0],
                "adaptthink": [0.5, -0.5], "adacot_trigger": [0.0, -1.0]}  # row 2 has no think block
    for name in REWARDS:
        opts = {"lambda_lower": 0.2, "lambda_upper": 0.5, "epsilon_frac": 0.25} if name == "length" else {}
        proc = subprocess.run([sys.executable, "-m", "steps.core.rewards", "score", "--reward", name,
                               "--options", json.dumps(opts), str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        out = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [o["id"] for o in out] == ["2hop__1", "2hop__2"] and all(isinstance(o["reward"], float) for o in out)
        if name in expected:
            assert [o["reward"] for o in out] == expected[name], name


def test_rewards_command_line_names_the_missing_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"completion": "x", "completion_ids": [1]}) + "\n")
    proc = subprocess.run([sys.executable, "-m", "steps.core.rewards", "score", "--reward", "length", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "ref_length" in proc.stderr and "rows.jsonl" in proc.stderr


def test_correctness_and_helpfulness_rewards_use_the_judge(musique_example):
    fns, weights = make_rewards({"correctness": {"weight": 2.0}, "helpfulness": {"weight": 1.0}})
    cols = {k: [v, v] for k, v in musique_example.items()}
    good = "<think> zono was born in dadada . </think> the answer is kestria . zono was born in dadada ."
    bad = "<think> zono works in dakasu . </think> the answer is sarnia ."
    assert [f([good, bad], **cols) for f in fns] == [[1.0, 0.0], [1.0, 0.0]]
    assert weights == [2.0, 1.0]
    assert [f.__name__ for f in fns] == ["correctness", "helpfulness"]


@pytest.mark.parametrize("response, correct, helpful, gated", [
    # right and helpful: paid either way
    ("the answer is kestria . zono was born in dadada .", 1.0, 1.0, 1.0),
    # right without the bridge fact: no helpfulness to pay
    ("the answer is kestria .", 1.0, 0.0, 0.0),
    # the bridge fact beside a wrong answer: helpful by the judge, paid only ungated
    ("the answer is sarnia . zono was born in dadada .", 0.0, 1.0, 0.0),
    # wrong and unhelpful
    ("the answer is sarnia .", 0.0, 0.0, 0.0),
])
def test_helpfulness_when_correct_pays_h_only_beside_a_right_answer(musique_example, response, correct, helpful,
                                                                      gated):
    from steps.core.rewards.livethinking import make_correctness, make_helpfulness
    cols = {k: [v] for k, v in musique_example.items()}
    completion = [f"<think> zono was born in dadada . </think> {response}"]
    assert make_correctness()(completion, **cols) == [correct]
    assert make_helpfulness()(completion, **cols) == [helpful]
    assert make_helpfulness(when_correct=True)(completion, **cols) == [gated]


def test_helpfulness_when_correct_must_be_a_boolean():
    with pytest.raises(ValueError, match="helpfulness.when_correct: expected true or false"):
        make_rewards({"helpfulness": {"when_correct": "yes"}})


def test_format_reward():
    fn = make_format()
    assert fn(["<think> a </think> b", "<think> a b", "a </think> b", "<think> a </think>"]) == [1.0, 0.0, 0.0, 0.0]


def test_grounding_reward_scores_the_thinking_against_the_context(musique_example):
    from steps.core.rewards.livethinking import make_grounding
    cols = {k: [v] * 3 for k, v in musique_example.items()}
    out = make_grounding()([
        "<think> zono was born in dadada . dadada is a city in kestria . </think> the answer is kestria .",
        "<think> suda works in farada . </think> the answer is kestria .",  # invented facts
        "the answer is kestria .",  # no thinking at all
    ], **cols)
    assert out[0] == 1.0 and out[1] < 0.5 and out[2] == 0.0


@pytest.mark.parametrize("unit", ["context", "claim"])
def test_grounding_reads_each_completions_own_context(musique_example, ecommerce_example, unit):
    # one batch, two examples in turn (the reward keeps each context's word sets for the call):
    # a thinking is grounded in its own example's documents, not in the other's
    from steps.core.rewards.livethinking import make_grounding
    rows = [musique_example, ecommerce_example, musique_example, ecommerce_example]
    cols = {k: [r[k] for r in rows] for k in musique_example}
    musique, ecommerce = "<think> zono was born in dadada . </think> x", "<think> the tolka lamp is green . </think> x"
    out = make_grounding(unit=unit)([musique, musique, ecommerce, ecommerce], **cols)
    assert out[0] == out[3] == 1.0 and out[1] < 0.5 and out[2] < 0.5


@pytest.mark.parametrize("thinking, context_score, claim_score, all_score", [
    # both claims said by one listing each: grounded by either unit
    ("the tolka lamp is green . the tolka lamp is made of glass .", 1.0, 1.0, 1.0),
    # the chimera: the asked product with the sibling's colour; every word is in the context,
    # no source says it
    ("the tolka lamp is red .", 1.0, 0.0, 0.0),
    # one claim supported, one chimera: half the claims, and nothing when every claim must hold
    ("the tolka lamp is green . the vimbo lamp is made of glass .", 1.0, 0.5, 0.0),
    # the chimera padded with two supported restatements: the share rises, `all` stays at 0
    ("the tolka lamp is green . the tolka lamp is green . the vimbo lamp is made of glass .",
     1.0, 2 / 3, 0.0),
    # restating the question is supported by the question itself
    ("what color is it ? the tolka lamp is green .", 1.0, 1.0, 1.0),
    # an invented colour: neither unit grounds it
    ("the tolka lamp is purple .", 2 / 3, 0.0, 0.0),
])
def test_grounding_by_claim_needs_one_source_per_sentence(ecommerce_example, thinking, context_score, claim_score,
                                                          all_score):
    from steps.core.rewards.livethinking import make_grounding
    cols = {k: [v] for k, v in ecommerce_example.items()}
    completion = [f"<think> {thinking} </think> the tolka lamp is green ."]
    assert make_grounding()(completion, **cols) == [pytest.approx(context_score)]
    assert make_grounding(unit="claim")(completion, **cols) == [pytest.approx(claim_score)]
    assert make_grounding(unit="claim", aggregate="all")(completion, **cols) == [pytest.approx(all_score)]


@pytest.mark.parametrize("unit", ["context", "claim"])
def test_grounding_with_framing_grounds_a_restated_question(ecommerce_example, unit):
    # "question" is a word of the user turn's template only: the restatement is grounded with
    # `framing`, not without; an invented attribute stays ungrounded either way
    from steps.core.rewards.livethinking import make_grounding
    cols = {k: [v] * 2 for k, v in ecommerce_example.items()}
    completions = ["<think> the question is : what color is it ? </think> x",
                   "<think> the tolka lamp is purple . </think> x"]
    plain = make_grounding(unit=unit)(completions, **cols)
    framed = make_grounding(unit=unit, framing=True)(completions, **cols)
    assert plain[0] < 1.0 and framed[0] == 1.0
    assert framed[1] == plain[1] < 1.0


def test_grounding_rejects_an_unknown_unit():
    from steps.core.rewards.livethinking import make_grounding
    with pytest.raises(ValueError, match="grounding.unit"):
        make_grounding(unit="sentence")
    with pytest.raises(ValueError, match="grounding.aggregate"):
        make_grounding(aggregate="all")  # a share of words has no "every claim"
