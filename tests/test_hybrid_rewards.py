"""Hybrid thinking's rewards (steps/core/rewards/hybrid.py): the think format, AdaptThink's
constrained reward and AdaCoT's trigger penalties, as tables."""
import json
import math
import subprocess
import sys

import pytest

from steps.core.rewards import REWARDS, check_spec
from steps.core.rewards.hybrid import format_ok, make_adacot_trigger, make_adaptthink, thinks

THINK = "<think> paris is the capital </think> the answer is paris ."
NO_THINK = "<think> </think> the answer is paris ."


# Our template's convention (think_opened_by: completion): the model writes the opener itself.
#   completion                                          | ok    | why
#   --------------------------------------------------- | ----- | ---------------------------------
#   <think> T </think> R                                | True  | one block, closed once
#   <think> </think> R                                  | True  | NoThinking is a (empty) block
#   <think> T </think>                                  | True  | format only: the judge sees "" and says 0
#   <think> T  (budget ran out)                         | False | never closed
#   <think> T </think> R </think>                       | False | closed twice
#   <think> T <think> U </think> R                      | False | a second opener
#   T </think> R                                        | False | no opener (R1-style: see below)
#   R                                                   | False | no block at all
#   (empty)                                             | False |
@pytest.mark.parametrize("completion,ok", [
    (THINK, True),
    (NO_THINK, True),
    ("<think> paris </think>", True),
    ("<think> paris is the capital", False),
    ("<think> a </think> the answer is paris . </think>", False),
    ("<think> a <think> b </think> the answer is paris .", False),
    ("paris is the capital </think> the answer is paris .", False),
    ("the answer is paris .", False),
    ("", False),
])
def test_format_our_template_opens_in_the_completion(completion, ok):
    assert format_ok(completion, "completion") is ok


# R1-style templates end the prompt with <think> (think_opened_by: prompt): the reference's rule
# verbatim, exactly one </think> and no <think> in the completion.
@pytest.mark.parametrize("completion,ok", [
    ("paris is the capital </think> the answer is paris .", True),
    ("</think> the answer is paris .", True),                     # NoThinking
    (THINK, False),                                               # an opener here is a second block
    ("paris </think> x </think> the answer is paris .", False),
    ("paris is the capital", False),
])
def test_format_r1_style_template_opens_in_the_prompt(completion, ok):
    assert format_ok(completion, "prompt") is ok


def test_an_unknown_convention_is_refused():
    with pytest.raises(ValueError, match="think_opened_by"):
        format_ok(THINK, "template")


# AdaptThink: r = acc - ref_accuracy + delta * forced_nothinking, delta = 0.05; acc is the rule
# judge's EM on the response (after </think>), 0 when the format fails.
#   completion                     | answers | ref  | forced | acc | reward
#   ------------------------------ | ------- | ---- | ------ | --- | ---------------
#   thinking, right                | paris   | 0.0  | no     |  1  |  1.0
#   thinking, right                | paris   | 0.5  | no     |  1  |  0.5
#   thinking, right                | paris   | 1.0  | no     |  1  |  0.0
#   thinking, wrong                | rome    | 0.0  | no     |  0  |  0.0
#   thinking, wrong                | rome    | 0.5  | no     |  0  | -0.5
#   thinking, wrong                | rome    | 1.0  | no     |  0  | -1.0
#   NoThinking, right              | paris   | 0.0  | yes    |  1  |  1.05
#   NoThinking, right              | paris   | 0.5  | yes    |  1  |  0.55
#   NoThinking, right              | paris   | 1.0  | yes    |  1  |  0.05   no-think as good as thinking: preferred
#   NoThinking, wrong              | rome    | 0.5  | yes    |  0  | -0.45
#   NoThinking, wrong              | rome    | 1.0  | yes    |  0  | -0.95
#   NoThinking text, not forced    | paris   | 0.5  | no     |  1  |  0.5    the bonus follows the forcing
#   right answer, never closed     | paris   | 0.5  | no     |  0  | -0.5    format failure: acc 0
#   right answer, closed twice     | paris   | 0.5  | yes    |  0  | -0.45   format failure, still forced
#   right answer, no opener        | paris   | 0.0  | no     |  0  |  0.0
#   empty completion               | paris   | 1.0  | no     |  0  | -1.0
@pytest.mark.parametrize("completion,answer,ref,forced,expected", [
    (THINK, "paris", 0.0, False, 1.0),
    (THINK, "paris", 0.5, False, 0.5),
    (THINK, "paris", 1.0, False, 0.0),
    (THINK, "rome", 0.0, False, 0.0),
    (THINK, "rome", 0.5, False, -0.5),
    (THINK, "rome", 1.0, False, -1.0),
    (NO_THINK, "paris", 0.0, True, 1.05),
    (NO_THINK, "paris", 0.5, True, 0.55),
    (NO_THINK, "paris", 1.0, True, 0.05),
    (NO_THINK, "rome", 0.5, True, -0.45),
    (NO_THINK, "rome", 1.0, True, -0.95),
    (NO_THINK, "paris", 0.5, False, 0.5),
    ("<think> the answer is paris .", "paris", 0.5, False, -0.5),
    ("<think> </think> the answer is paris . </think>", "paris", 0.5, True, -0.45),
    ("the answer is paris .", "paris", 0.0, False, 0.0),
    ("", "paris", 1.0, False, -1.0),
])
def test_adaptthink_reward_table(completion, answer, ref, forced, expected):
    fn = make_adaptthink(delta=0.05)
    out = fn([completion], answers=[[answer]], ref_accuracy=[ref], forced_nothinking=[forced])
    assert out == [pytest.approx(expected)]


def test_adaptthink_scores_a_whole_group_in_one_call():
    fn = make_adaptthink(delta=0.1)
    out = fn([THINK, NO_THINK, "<think> x", NO_THINK], answers=[["paris"]] * 4, ref_accuracy=[0.25] * 4,
             forced_nothinking=[False, True, False, True])
    assert out == pytest.approx([0.75, 0.85, -0.25, 0.85])


def test_adaptthink_uses_the_shared_judge_on_full_examples(musique_example):
    """In training the rows are whole examples: the rule judge scores them as everywhere else."""
    ex = musique_example
    right = f"<think> x </think> the answer is {ex['answers'][0]} ."
    cols = {c: [ex[c]] for c in ex}
    out = make_adaptthink()([right], ref_accuracy=[0.5], forced_nothinking=[False], **cols)
    assert out == [pytest.approx(0.5)]


@pytest.mark.parametrize("ref,message", [
    (None, r"prompt q7: ref_accuracy must be a number in \[0, 1\], got None"),
    (1.5, r"prompt q7: ref_accuracy must be a number in \[0, 1\], got 1.5"),
    (float("nan"), r"prompt q7: ref_accuracy must be a number"),
])
def test_adaptthink_names_the_prompt_whose_ref_accuracy_is_bad(ref, message):
    with pytest.raises(ValueError, match=message):
        make_adaptthink()([THINK], answers=[["paris"]], ref_accuracy=[ref], forced_nothinking=[False], id=["q7"])


def test_adaptthink_says_which_column_is_missing():
    with pytest.raises(KeyError, match="ref_accuracy"):
        make_adaptthink()([THINK], answers=[["paris"]], forced_nothinking=[False])
    with pytest.raises(KeyError, match="forced_nothinking"):
        make_adaptthink()([THINK], answers=[["paris"]], ref_accuracy=[0.5])
    with pytest.raises(KeyError, match="answers"):
        make_adaptthink()([THINK], ref_accuracy=[0.5], forced_nothinking=[False])


def test_adaptthink_never_raises_on_garbage_completions():
    junk = ["</think></think>", "<think>", "<think> <think> <think>", "\n\n", "</think> <think> x", "<think> </think>"]
    out = make_adaptthink()(junk, answers=[["paris"]] * len(junk), ref_accuracy=[0.5] * len(junk),
                            forced_nothinking=[False] * len(junk))
    assert out == [pytest.approx(-0.5)] * len(junk)


def test_adaptthink_runs_from_the_rewards_command_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"id": "a", "completion": NO_THINK, "answers": ["paris"], "ref_accuracy": 1.0, "forced_nothinking": True},
        {"id": "b", "completion": THINK, "answers": ["rome"], "ref_accuracy": 0.5, "forced_nothinking": False},
    ]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "steps.core.rewards", "score", "--reward", "adaptthink",
                           "--options", '{"delta": 0.05}', str(rows)], capture_output=True, text=True, check=True)
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [g["id"] for g in got] == ["a", "b"]
    assert got[0]["reward"] == pytest.approx(0.05) and got[1]["reward"] == pytest.approx(-0.5)


# AdaCoT's trigger penalties (missed 1.0, unneeded 0.5, format 2.0; hops >= 2 needs a CoT):
#   completion       | hops | needs CoT | thinks | penalty
#   ---------------- | ---- | --------- | ------ | -------------------
#   thinking         |  1   | no        | yes    | -0.5   unneeded CoT
#   NoThinking       |  1   | no        | no     |  0
#   thinking         |  3   | yes       | yes    |  0
#   NoThinking       |  3   | yes       | no     | -1.0   missed CoT
#   thinking         | None | unknown   | yes    |  0     no label: no trigger penalty
#   never closed     |  1   | no        | -      | -2.0   format only (no readable decision)
#   no block         |  3   | yes       | -      | -2.0
@pytest.mark.parametrize("completion,hops,expected", [
    (THINK, 1, -0.5), (NO_THINK, 1, 0.0), (THINK, 3, 0.0), (NO_THINK, 3, -1.0), (THINK, None, 0.0),
    ("<think> paris is", 1, -2.0), ("the answer is paris .", 3, -2.0),
])
def test_adacot_trigger_penalty_table(completion, hops, expected):
    fn = make_adacot_trigger(missed_cot=1.0, unneeded_cot=0.5, bad_format=2.0, min_hops=2)
    assert fn([completion], hops=[hops]) == [pytest.approx(expected)]


def test_adacot_min_hops_moves_the_boundary():
    fn = make_adacot_trigger(missed_cot=1.0, unneeded_cot=1.0, min_hops=3)
    assert fn([NO_THINK, NO_THINK, THINK], hops=[2, 3, 2]) == [0.0, -1.0, -1.0]


def test_adacot_refuses_negative_coefficients_and_bad_hops():
    with pytest.raises(ValueError, match="missed_cot"):
        make_adacot_trigger(missed_cot=-1.0)
    with pytest.raises(ValueError, match="hops must be an integer"):
        make_adacot_trigger()([THINK], hops=["two"])


def test_think_ratio_counts_non_empty_thinking():
    assert [thinks(c) for c in (THINK, NO_THINK, "the answer is x .")] == [True, False, False]


def test_both_rewards_are_registered_with_checkable_options():
    assert {"adaptthink", "adacot_trigger"} <= set(REWARDS)
    check_spec({"adaptthink": {"weight": 1.0, "delta": 0.05}, "adacot_trigger": {"missed_cot": 0.3}}, "x.rewards")
    with pytest.raises(ValueError, match="x.rewards.adaptthink.delta: expected a number"):
        check_spec({"adaptthink": {"delta": "big"}}, "x.rewards")
    assert math.isclose(make_adaptthink(delta=0.2)([NO_THINK], answers=[["x"]], ref_accuracy=[0.0],
                                                   forced_nothinking=[1])[0], 0.2)
