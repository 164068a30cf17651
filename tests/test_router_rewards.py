"""Router-R1's rewards (steps/core/rewards/router.py): the format rules as a table, the cost scale
on a known sequence, the combination with alpha, and the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from steps.core.rewards.router import (RollingCostScale, final_answer, format_violation, make_cost, make_router_r1,
                                       outcome_score)

POOL = ["teacher", "student_base", "rft"]
INFO = "<information> the answer is dadada . </information>"

# (completion, the first rule it breaks or None), one row per rule and the valid shapes.
FORMAT_TABLE = [
    # valid: no call at all
    ("<think> zono was born in dadada . </think> <answer> kestria </answer>", None),
    # valid: one round
    (f"<think> need the city </think> <search> teacher : where was zono born ? </search> {INFO} "
     "<think> dadada is in kestria </think> <answer> kestria </answer>", None),
    # valid: three rounds over three members, surrounding whitespace ignored
    (f"  <think> a </think> <search> rft : where was zono born ? </search> {INFO} <think> b </think> "
     f"<search> student_base : where is dadada ? </search> {INFO} <think> c </think> "
     f"<search> teacher : which country ? </search> {INFO} <think> d </think> <answer> kestria </answer>\n", None),
    # valid: names are case-insensitive
    (f"<think> a </think> <search> Teacher : where was zono born ? </search> {INFO} <answer> x </answer>", None),
    # no tag block at all
    ("kestria", "no blocks"),
    # unbalanced: an open think never closed
    ("<think> a </think> <think> b <answer> x </answer>", "unbalanced"),
    # unbalanced: a stray close
    ("<think> a </think> </search> <answer> x </answer>", "unbalanced"),
    # nested: a search inside a think
    ("<think> a <search> teacher : q </search> </think> <answer> x </answer>", "nested"),
    # nested: an answer inside an information block
    ("<think> a </think> <search> teacher : q ? </search> <information> <answer> x </answer> </information> "
     "<answer> x </answer>", "nested"),
    # empty think block
    ("<think> </think> <answer> x </answer>", "empty think"),
    # a think block that is only the prompt's ellipsis
    ("<think> ... </think> <answer> x </answer>", "empty think"),
    # no answer
    ("<think> a </think>", "answer count"),
    # two answers
    ("<think> a </think> <answer> x </answer> <answer> y </answer>", "answer count"),
    # no think block at all
    ("<answer> x </answer>", "no think"),
    # a search whose information is missing
    ("<think> a </think> <search> teacher : where ? </search> <answer> x </answer>", "searches != informations"),
    # does not start with <think>
    ("so <think> a </think> <answer> x </answer>", "start"),
    # does not end with </answer>
    ("<think> a </think> <answer> x </answer> done", "end"),
    # query without a colon
    (f"<think> a </think> <search> teacher where was zono born </search> {INFO} <answer> x </answer>", "query"),
    # two colons
    (f"<think> a </think> <search> teacher : rft : born ? </search> {INFO} <answer> x </answer>", "query"),
    # empty query
    (f"<think> a </think> <search> teacher : </search> {INFO} <answer> x </answer>", "query"),
    # the prompt's placeholder copied
    (f"<think> a </think> <search> name : query </search> {INFO} <answer> x </answer>", "query"),
    # the reference's placeholder copied
    (f"<think> a </think> <search> llm-name : your-query </search> {INFO} <answer> x </answer>", "query"),
    # the query repeats the member's name (a descriptor copied into the query)
    (f"<think> a </think> <search> teacher : teacher is the strongest </search> {INFO} <answer> x </answer>", "query"),
    # a member that is not in the pool
    (f"<think> a </think> <search> oracle : where was zono born ? </search> {INFO} <answer> x </answer>",
     "unknown member"),
]


@pytest.mark.parametrize("text, rule", FORMAT_TABLE)
def test_format_rules(text, rule):
    assert format_violation(text, POOL) == rule


def test_format_reward_is_zero_or_minus_one():
    from steps.core.rewards import REWARDS
    fn = REWARDS["router_format"](members=POOL)
    assert fn([t for t, _ in FORMAT_TABLE]) == [0.0 if r is None else -1.0 for _, r in FORMAT_TABLE]


@pytest.mark.parametrize("text, answer", [
    ("<think> a </think> <answer> kestria </answer>", "kestria"),
    ("<think> a </think> <answer> the answer is kestria . </answer>", "kestria"),
    ("<think> a </think> <answer> x </answer> <answer> y </answer>", "y"),   # the last one, as the reference
    ("<think> a </think>", None),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_outcome_uses_the_official_normalisation():
    text = "<think> a </think> <answer> The Kestria! </answer>"
    assert outcome_score(text, ["kestria"], "em") == 1.0
    assert outcome_score("<think> a </think> <answer> north kestria </answer>", ["kestria"], "f1") == pytest.approx(2 / 3)
    assert outcome_score("<think> a </think>", ["kestria"], "f1") == 0.0


def test_cost_scale_on_a_known_sequence():
    """costs 0, 1, 4, 9, 16 (sqrt 0..4), then 0, then 4; percentiles by linear interpolation
    over the window, the current value included."""
    scale = RollingCostScale(window=1000)
    got = [scale(c) for c in [0, 1, 4, 9, 16, 0, 4]]
    expected = [
        0.5,                    # one value: no spread
        0.0,                    # [0, 1]: p5 0.05, p95 0.95; 1 is above p95 -> clipped to 1 -> flipped 0
        0.0,                    # [0, 1, 2]: p95 1.9 < 2
        0.0,                    # [0..3]: p95 2.85 < 3
        0.0,                    # [0..4]: p95 3.8 < 4
        1.0,                    # sorted [0, 0, 1, 2, 3, 4]: p5 0, p95 3.75; 0 -> 0 -> flipped 1
        1.0 - 2.0 / 3.7,        # sorted [0, 0, 1, 2, 2, 3, 4]: p5 0 (index 0.3), p95 3.7 (index 5.7)
    ]
    assert got == pytest.approx(expected)


def test_cost_scale_forgets_beyond_the_window():
    """window 2: the third value is scaled against the second and itself only."""
    scale = RollingCostScale(window=2)
    scale(100.0)                          # sqrt 10: forgotten at the third call
    scale(0.0)
    # window [0, 1]: p5 0.05, p95 0.95 -> 1 -> flipped 0; with 10 still in, sqrt(1) would score high
    assert scale(1.0) == pytest.approx(0.0)
    assert list(scale.values) == [0.0, 1.0]


def test_cost_reward_is_one_window_per_reward_function():
    a, b = make_cost(), make_cost()
    a([""] * 2, cost=[0.0, 4.0])
    assert a([""], cost=[0.0]) == [1.0]      # a has spread in its window
    assert b([""], cost=[0.0]) == [0.5]      # b starts empty: a fresh training run


@pytest.mark.parametrize("alpha, text, cost_scaled, expected", [
    # right answer, good format: (1 + 0)(1 - a) + c a
    (0.0, "<think> a </think> <answer> kestria </answer>", None, 1.0),
    (0.5, "<think> a </think> <answer> kestria </answer>", 1.0, 0.5 * 1 + 0.5 * 1.0),
    (0.9, "<think> a </think> <answer> kestria </answer>", 0.0, 0.1),
    # wrong answer: the format term only, whatever the cost
    (0.9, "<think> a </think> <answer> dadada </answer>", 1.0, 0.0),
    # broken format: -1 even when the answer is right
    (0.5, "<answer> kestria </answer>", 1.0, -1.0),
])
def test_router_r1_combination(alpha, text, cost_scaled, expected):
    fn = make_router_r1(alpha=alpha, members=POOL)
    # two responses: a cheap one (cost 0) and a dear one (cost 9); the second is the one under test
    cost = 0.0 if cost_scaled == 1.0 else 9.0
    other = 9.0 if cost == 0.0 else 0.0
    out = fn(["<think> a </think> <answer> x </answer>", text], answers=[["kestria"]] * 2, cost=[other, cost])
    assert out[1] == pytest.approx(expected)


def test_router_r1_checks_its_options():
    with pytest.raises(ValueError, match="alpha"):
        make_router_r1(alpha=1.5)
    with pytest.raises(ValueError, match="metric"):
        make_router_r1(metric="acc")


def test_router_rewards_run_from_the_command_line(tmp_path):
    rows = [
        {"id": "a", "completion": "<think> a </think> <answer> kestria </answer>", "answers": ["kestria"], "cost": 0.0},
        {"id": "b", "completion": "<think> a </think> <search> teacher : where ? </search> <information> k "
                                  "</information> <answer> kestria </answer>", "answers": ["kestria"], "cost": 9.0},
        {"id": "c", "completion": "<answer> kestria </answer>", "answers": ["kestria"], "cost": 1.0},
    ]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "steps.core.rewards", "score", "--reward", "router_r1",
                           "--options", json.dumps({"alpha": 0.5}), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line) for line in proc.stdout.splitlines()]
    # window after a: [0] -> 0.5; after b: [0, 3] -> b above p95 -> 0; c: format broken -> -1
    assert [g["id"] for g in got] == ["a", "b", "c"]
    assert [g["reward"] for g in got] == pytest.approx([0.5 + 0.25, 0.5 + 0.0, -1.0])
