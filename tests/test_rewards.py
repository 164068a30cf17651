import pytest

from steps.core.rewards import composite_reward, length_reward, make_format, make_length, make_rewards


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


# w_c, w_h, w_l = 1.0, 0.5, 0.25
#   C | H | r_len | r
#   0 | 0 | 0.0   | 0.0
#   1 | 0 | 0.0   | 1.0
#   0 | 1 | 0.0   | 0.5
#   0 | 0 | 1.0   | 0.25
#   1 | 1 | 1.0   | 1.75   the maximum
#   1 | 1 | 0.5   | 1.625
@pytest.mark.parametrize("c,h,rl,expected", [
    (0, 0, 0.0, 0.0), (1, 0, 0.0, 1.0), (0, 1, 0.0, 0.5), (0, 0, 1.0, 0.25), (1, 1, 1.0, 1.75), (1, 1, 0.5, 1.625)])
def test_composite_reward_table(c, h, rl, expected):
    assert composite_reward(c, h, rl, 1.0, 0.5, 0.25) == pytest.approx(expected)


def test_length_reward_function_uses_token_ids_and_ref_length():
    fn = make_length(lambda_lower=0.0, lambda_upper=0.5, epsilon_frac=0.5)
    # ref 40 -> band [0, 20], epsilon 20: 10 tokens -> 1, 30 tokens -> 0.5, 40 tokens -> 0
    out = fn(["a", "b", "c"], completion_ids=[[1] * 10, [1] * 30, [1] * 40], ref_length=[40, 40, 40])
    assert out == [1.0, 0.5, 0.0]


def test_length_reward_without_ref_length_says_what_is_missing():
    with pytest.raises(KeyError, match="ref_length"):
        make_length()(["a"], completion_ids=[[1]])


def test_correctness_and_helpfulness_rewards_use_the_judge(musique_example):
    fns, weights = make_rewards({"correctness": {"weight": 2.0}, "helpfulness": {"weight": 1.0}})
    cols = {k: [v, v] for k, v in musique_example.items()}
    good = "<think> zono was born in dadada . </think> the answer is kestria . zono was born in dadada ."
    bad = "<think> zono works in dakasu . </think> the answer is sarnia ."
    assert [f([good, bad], **cols) for f in fns] == [[1.0, 0.0], [1.0, 0.0]]
    assert weights == [2.0, 1.0]
    assert [f.__name__ for f in fns] == ["correctness", "helpfulness"]


def test_unknown_reward_is_named():
    with pytest.raises(ValueError, match="nope"):
        make_rewards({"nope": {}})


def test_format_reward():
    fn = make_format()
    assert fn(["<think> a </think> b", "<think> a b", "a </think> b", "<think> a </think>"]) == [1.0, 0.0, 0.0, 0.0]


def test_grounding_reward_scores_the_thinking_against_the_context(musique_example):
    from steps.core.rewards import make_grounding
    cols = {k: [v] * 3 for k, v in musique_example.items()}
    out = make_grounding()([
        "<think> zono was born in dadada . dadada is a city in kestria . </think> the answer is kestria .",
        "<think> suda works in farada . </think> the answer is kestria .",  # invented facts
        "the answer is kestria .",  # no thinking at all
    ], **cols)
    assert out[0] == 1.0 and out[1] < 0.5 and out[2] == 0.0
