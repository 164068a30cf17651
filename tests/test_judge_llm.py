"""The LLM judge against the fake OpenAI server (verdicts by a simple rule, or scripted), its
tolerant JSON parsing, retries on unparseable replies, majority votes and cache; and the
agreement statistics (Cohen's kappa checked on a hand-computed table)."""
from __future__ import annotations

import json
import math

import pytest

from steps.core.backends import derive_seed
from steps.core.io import InputError, write_jsonl
from steps.core.judge_agreement import accuracy, agreement, cohen_kappa, confusion
from steps.core.judge_agreement import main as agreement_main
from steps.core.judge_llm import (SYSTEM_PROMPT, VERDICT_SCHEMA, Ballot, LLMJudge, VerdictParseError, majority,
                                  parse_verdict)
from steps.core.judges import Verdict, make_judge
from tests.openai_fake_server import FakeOpenAIServer

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.2, "progress": False}

# (response to the e-commerce fixture, fake rule's verdict): grounded + two sentences = C1 H1;
# grounded, one sentence = C1 H0; an unsupported word ("metal") = C0 H0.
CASES = [
    ("the answer is the tolka lamp is green . the tolka lamp is made of glass .", (1, 1)),
    ("the answer is green .", (1, 0)),
    ("the answer is the tolka lamp is made of metal .", (0, 0)),
]


def judge(server: FakeOpenAIServer, **kw) -> LLMJudge:
    return make_judge("llm", model="fake", base_url=server.base_url, **{**FAST, **kw})


@pytest.mark.parametrize("text,expected", [
    ('{"rationale": "ok", "correct": 1, "helpful": 0}', Ballot(1, 0, "ok")),
    ('Verdict:\n```json\n{"correct": true, "helpful": "1", "rationale": "r"}\n```\nDone.', Ballot(1, 1, "r")),
    ('<think>maybe {"correct": 0, "helpful": 0}</think>\n{"correct": 1, "helpful": 1}', Ballot(1, 1, "")),
    ('set {a, b} then {"correct": "no", "helpful": "yes", "rationale": "x"}', Ballot(0, 1, "x")),
    ('{"rationale": "two\nlines\tand \x02", "correct": 1, "helpful": 0}', Ballot(1, 0, "two\nlines\tand \x02")),
])
def test_parse_verdict_is_tolerant(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("text,message", [
    ("It is correct and helpful.", "no JSON verdict"),
    ('{"correct": 1, "rationale": "x"}', "lacks field 'helpful'"),
    ('{"correct": 2, "helpful": 0}', "'correct' must be 0 or 1"),
    ('{"correct": 0.5, "helpful": 0}', "'correct' must be 0 or 1"),
    ('{"correct": [1], "helpful": 0}', "'correct' must be 0 or 1"),
    ('{"correct": 1, "helpful": 1', "no JSON verdict"),
])
def test_parse_verdict_refuses(text, message):
    with pytest.raises(VerdictParseError, match=message):
        parse_verdict(text)


@pytest.mark.parametrize("ballots,expected", [
    # (correct, helpful) per vote -> majority per criterion; a tie counts 0
    ([(1, 1), (1, 0), (0, 0)], (1, 0)),
    ([(0, 1), (0, 1), (1, 1)], (0, 1)),
    ([(1, 1), (0, 0)], (0, 0)),
    ([(1, 0)], (1, 0)),
])
def test_majority_table(ballots, expected):
    v = majority([Ballot(c, h, f"b{i}") for i, (c, h) in enumerate(ballots)])
    assert (v.correct, v.helpful) == expected


def test_verdicts_follow_the_server_and_the_prompt_holds_the_definitions(serve, ecommerce_example):
    server = serve()
    verdicts = judge(server).judge([ecommerce_example] * 3, [r for r, _ in CASES])
    assert [(v.correct, v.helpful) for v in verdicts] == [want for _, want in CASES]
    assert "every word is in the context" in verdicts[0].rationale and "metal" in verdicts[2].rationale
    # Requests run concurrently, so the server sees them in any order: take the first case's.
    body = next(b for b in server.bodies if CASES[0][0] in b["messages"][1]["content"])
    assert body["response_format"]["json_schema"]["schema"] == VERDICT_SCHEMA and body["temperature"] == 0.0
    system, user = body["messages"][0]["content"], body["messages"][1]["content"]
    assert system == SYSTEM_PROMPT
    for phrase in ("every claim in R is verifiable in the documents D", "consistent with the dialogue history H",
                   "directly answers the question Q", "anticipates the user's likely need",
                   "supplementary information grounded in the context"):
        assert phrase in system
    for part in ("[1] the tolka lamp is green .", "user: the tolka lamp .", "what color is it ?", CASES[0][0]):
        assert part in user


def test_unguided_replies_with_prose_are_parsed(serve, ecommerce_example):
    server = serve()
    verdicts = judge(server, guided=False).judge([ecommerce_example] * 3, [r for r, _ in CASES])
    assert [(v.correct, v.helpful) for v in verdicts] == [want for _, want in CASES]
    assert all("response_format" not in b for b in server.bodies)


def test_unparseable_replies_are_asked_again_with_a_fresh_seed(serve, ecommerce_example, musique_example):
    def script(n: int, body: dict) -> str:  # the first two replies are not verdicts
        if n < 2:
            return "I think this response is fine."
        return json.dumps({"rationale": "scripted", "correct": 1, "helpful": 1})

    server = serve(judge_fn=script)
    j = judge(server, guided=False, retry_temperature=0.6)
    verdicts = j.judge([ecommerce_example, musique_example], ["the answer is green .", "the answer is kestria ."])
    assert [(v.correct, v.helpful) for v in verdicts] == [(1, 1), (1, 1)]
    assert server.posts == 4
    first, retry = server.bodies[0], server.bodies[2]
    assert first["temperature"] == 0.0 and retry["temperature"] == 0.6  # greedy would only repeat itself
    assert first["seed"] != retry["seed"]


def test_persistently_unparseable_replies(serve, ecommerce_example):
    server = serve(judge_fn=lambda n, body: "no verdict here")
    j = judge(server, max_parse_attempts=2, max_unparseable_fraction=1.0)
    v = j.judge([ecommerce_example], ["the answer is green ."])[0]
    assert (v.correct, v.helpful) == (0, 0) and v.rationale.startswith("no parseable verdict")
    assert server.posts == 2
    strict = judge(server, max_parse_attempts=2)
    with pytest.raises(RuntimeError, match=r"1/1 judge replies had no JSON verdict after 2 attempts.*guided"):
        strict.judge([ecommerce_example], ["the answer is green ."])


def test_majority_vote_over_scripted_ballots(serve, ecommerce_example):
    plan = {0: (1, 1), 1: (1, 0), 2: (0, 0)}  # vote -> ballot
    by_seed = {derive_seed(0, "judge", ecommerce_example["id"], v, 0): b for v, b in plan.items()}

    def script(n: int, body: dict) -> str:
        c, h = by_seed[body["seed"]]
        return json.dumps({"rationale": f"ballot {c}{h}", "correct": c, "helpful": h})

    server = serve(judge_fn=script)
    v = judge(server, votes=3, temperature=0.7).judge([ecommerce_example], ["the answer is green ."])[0]
    assert (v.correct, v.helpful) == (1, 0) and server.posts == 3
    assert v.rationale == "votes correct 2/3, helpful 1/3; ballot 10"
    with pytest.raises(ValueError, match="votes > 1 needs temperature > 0"):
        judge(server, votes=3)


def test_cache_replays_verdicts_without_requests(serve, ecommerce_example, tmp_path):
    first = serve()
    responses = [r for r, _ in CASES] + [CASES[0][0]]  # a repeated response is asked once
    verdicts = judge(first, cache_dir=str(tmp_path)).judge([ecommerce_example] * 4, responses)
    assert first.posts == 3
    other = serve()
    again = judge(other, cache_dir=str(tmp_path)).judge([ecommerce_example] * 4, responses)
    assert other.posts == 0 and again == verdicts and again[0].rationale


def test_empty_responses_and_transport_faults(serve, ecommerce_example):
    server = serve(faults={0: "500", 1: "malformed"})
    verdicts = judge(server).judge([ecommerce_example] * 2, ["  ", CASES[0][0]])
    assert verdicts[0] == Verdict(0, 0, "empty response")
    assert (verdicts[1].correct, verdicts[1].helpful) == (1, 1) and server.posts == 3


def test_judge_stage_with_the_llm_judge(serve, ecommerce_example):
    from steps.judge import JudgeConfig
    from steps.judge import judge as judge_stage

    server = serve()
    cands = [{"id": "e1", "dataset": "ecommerce", "sample_idx": j, "completion": r, "thinking": "", "response": r,
              "completion_tokens": 5, "finish_reason": "stop", "model": "fake"} for j, (r, _) in enumerate(CASES)]
    cfg = JudgeConfig(kind="llm", options={"model": "fake", "base_url": server.base_url, **FAST})
    judged, kept, stats = judge_stage(cfg, [ecommerce_example], cands)
    assert [r["keep"] for r in judged] == [True, False, False] and len(kept) == 1
    assert all(r["rationale"] for r in judged) and stats["ecommerce"]["correct_rate"] == pytest.approx(2 / 3)


# -- agreement ------------------------------------------------------------------------------

def test_kappa_on_a_hand_computed_table():
    # judge\label   1    0
    #   1          20    5      p_o = (20+15)/50 = 0.70
    #   0          10   15      p_e = 0.5*0.6 + 0.5*0.4 = 0.50  -> kappa = 0.2/0.5 = 0.40
    pred = [1] * 20 + [1] * 5 + [0] * 10 + [0] * 15
    gold = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert accuracy(pred, gold) == pytest.approx(0.70)
    assert cohen_kappa(pred, gold) == pytest.approx(0.40)
    assert confusion(pred, gold) == {"tp": 20, "fp": 5, "fn": 10, "tn": 15}
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    assert cohen_kappa([0, 1, 1], [0, 1, 1]) == pytest.approx(1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))
    with pytest.raises(ValueError, match="differ in length"):
        cohen_kappa([1], [1, 0])


def test_agreement_files_join_on_id_and_sample(tmp_path, capsys):
    def row(i, j, c, h):
        return {"id": i, "sample_idx": j, "correct": c, "helpful": h}

    judged = [row("a", 0, 1, 0), row("a", 1, 0, 0), row("b", 0, 1, 1)]
    labels = [row("b", 0, 1, 0), row("a", 1, 0, 0), row("a", 0, 1, 0)]  # another order: joined by key
    write_jsonl(tmp_path / "j.jsonl", judged)
    write_jsonl(tmp_path / "l.jsonl", labels)
    report = agreement(tmp_path / "j.jsonl", tmp_path / "l.jsonl")
    assert report["correct"]["accuracy"] == 1.0 and report["correct"]["kappa"] == pytest.approx(1.0)
    assert report["helpful"]["accuracy"] == pytest.approx(2 / 3) and report["helpful"]["fp"] == 1
    assert agreement_main([str(tmp_path / "j.jsonl"), str(tmp_path / "l.jsonl")]) == 0
    assert json.loads(capsys.readouterr().out)["helpful"]["kappa"] == pytest.approx(0.0)  # chance level
    write_jsonl(tmp_path / "l.jsonl", labels[:2])
    with pytest.raises(InputError, match=r"j.jsonl: line 1: \(id, sample_idx\) \('a', 0\) has no row in .*l.jsonl"):
        agreement(tmp_path / "j.jsonl", tmp_path / "l.jsonl")
    write_jsonl(tmp_path / "l.jsonl", [{**labels[0], "correct": "yes"}])
    with pytest.raises(InputError, match="l.jsonl: line 1: field 'correct': expected 0 or 1, got 'yes'"):
        agreement(tmp_path / "j.jsonl", tmp_path / "l.jsonl")
