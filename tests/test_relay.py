"""RelayLLM: relay decoding (steps/core/rollouts/relay.py) on a scripted student and a toy teacher."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from steps.core.backends import Completion, SamplingParams
from steps.core.prompts import Prompt
from tests.helpers import TINY_DENSE, examples, record_loss_gradients, tiny_model

TEACHER_WORD = "question"   # the toy teacher writes only this word


@pytest.fixture(scope="module")
def tok():
    from steps.core import modeling
    from steps.pretrain_demo import corpus_texts

    t = modeling.build_tokenizer(corpus_texts(examples(3, 2)))
    t.add_tokens(["<call>", "</call>"])
    t.padding_side = "left"
    return t


class ScriptedStudent:
    """A causal LM stand-in whose next token follows a script: script[k], k = the tokens after
    the prompt that are not the teacher's word. It honours `generate`'s contract as the relay
    rollout uses it: left padding, per-row stopping criteria, EOS, padding after a row stops."""

    def __init__(self, tok, scripts: dict[str, str]):
        self.tok = tok
        self.scripts = {k: tok(v, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k, v in scripts.items()}
        self.teacher_id = tok.convert_tokens_to_ids(TEACHER_WORD)
        self.generation_config = SimpleNamespace(eos_token_id=tok.eos_token_id)
        self.calls = 0

    def _next(self, ids: list[int]) -> int:
        text = self.tok.decode(ids, skip_special_tokens=True)
        script = next(v for k, v in self.scripts.items() if f": {k} <assistant>" in text)
        after = ids[ids.index(self.tok.convert_tokens_to_ids("<assistant>")) + 1:]
        k = sum(t != self.teacher_id for t in after)
        return script[min(k, len(script) - 1)]

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, pad_token_id, eos_token_id,
                 **_):
        import torch

        self.calls += 1
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        out = input_ids.clone()
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = []
            for i, r in enumerate(rows):
                t = pad_token_id if done[i] else self._next(r)
                r.append(t)
                nxt.append(t)
            new = torch.tensor(nxt).unsqueeze(1)
            out = torch.cat([out, new], dim=1)
            done |= new.squeeze(1) == eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id
            done |= stopping_criteria[0](out, None)
            if done.all():
                break
        return out


class ToyTeacher:
    """Writes n copies of TEACHER_WORD; records the text it was given; fails on request."""
    name = "toy"

    def __init__(self, tok, fail_on: str | None = None, stop_after: int | None = None):
        self.tokenizer, self.fail_on, self.stop_after = tok, fail_on, stop_after
        self.seen: list[str] = []
        self.batches: list[int] = []

    def generate(self, prompts, sampling, on_batch=None):
        self.batches.append(len(prompts))
        out = []
        for p in prompts:
            if self.fail_on and self.fail_on in p.text:
                raise RuntimeError("HTTP 503 after retries")
            self.seen.append(p.text)
            n = sampling.max_new_tokens if self.stop_after is None else min(self.stop_after, sampling.max_new_tokens)
            ids = tuple(self.tokenizer.convert_tokens_to_ids([TEACHER_WORD] * n))
            out.append([Completion(text=" ".join([TEACHER_WORD] * n), completion_tokens=n, finish_reason="length",
                                   prompt_tokens=len(p.text.split()), token_ids=ids)])
        return out

    def close(self):
        pass


def _relay(tok, scripts, teacher=None, protocol="relay", **options):
    from steps.core.rollouts import make_rollout

    student = ScriptedStudent(tok, scripts)
    backend = SimpleNamespace(name="transformers", model=student, tokenizer=tok, device="cpu", batch_size=64,
                              model_name="scripted", _eos_ids=lambda: [tok.eos_token_id], close=lambda: None)
    teacher = teacher or ToyTeacher(tok)
    return make_rollout(protocol, backend, teacher_backend_obj=teacher, **options), teacher, student


def _prompt(tok, key):
    text = tok.apply_chat_template([{"role": "user", "content": f"documents : {key}"}], tokenize=False,
                                   add_generation_prompt=True)
    return Prompt(messages=(), text=text, key=key)


def _words(tok, ids):
    return tok.convert_ids_to_tokens(list(ids))


GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=40)


def test_the_teacher_inserts_exactly_n_tokens_after_the_command_and_never_sees_it(tok):
    """`<call> 3 </call>`: the student pauses after the close; the teacher, given the text so far
    with the command removed, writes exactly 3 tokens (mask 0) right after it; the student
    resumes after them. Two rows in flight: the one waiting on the teacher and the other."""
    rollout, teacher, _ = _relay(tok, {"1": "the answer is <call> 3 </call> x .", "2": "the answer is 7 ."})
    (a,), (b,) = rollout.run([_prompt(tok, "1"), _prompt(tok, "2")], GREEDY)
    assert _words(tok, a.token_ids) == ["the", "answer", "is", "<call>", "3", "</call>",
                                        TEACHER_WORD, TEACHER_WORD, TEACHER_WORD, "x", "."]
    assert a.mask == (1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1)
    assert a.finish_reason == "stop"
    assert a.meta["calls"] == 1 and a.meta["teacher_tokens"] == 3 and a.meta["student_tokens"] == 8
    assert a.meta["call_ratio"] == pytest.approx(3 / 11) and a.meta["malformed_calls"] == 0
    # The teacher saw the prompt and the student's text, no command tag and no number of it.
    assert len(teacher.seen) == 1
    seen = teacher.seen[0]
    assert seen.startswith(_prompt(tok, "1").text) and seen.endswith("the answer is")
    assert "<call>" not in seen and "</call>" not in seen and " 3" not in seen[len(_prompt(tok, "1").text):]
    assert _words(tok, b.token_ids) == ["the", "answer", "is", "7", "."] and b.mask == (1,) * 5
    assert b.meta["calls"] == 0 and b.meta["teacher_tokens"] == 0


def test_waiting_sequences_go_to_the_teacher_together(tok):
    scripts = {str(i): f"is <call> {i} </call> ." for i in range(1, 5)}
    rollout, teacher, student = _relay(tok, scripts)
    outs = rollout.run([_prompt(tok, k) for k in scripts], GREEDY)
    assert teacher.batches == [4]  # one teacher call for the four waiting rows
    assert student.calls == 2      # one student round before the teacher, one after
    assert [o[0].meta["teacher_tokens"] for o in outs] == [1, 2, 3, 4]


def test_n_is_capped_by_the_param_and_by_the_budget_left(tok):
    rollout, _, _ = _relay(tok, {"1": "is <call> 9 </call> x ."}, max_call_tokens=5)
    (a,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert a.meta["teacher_tokens"] == 5
    rollout, _, _ = _relay(tok, {"1": "is <call> 9 </call> x ."})
    (a,), = rollout.run([_prompt(tok, "1")], SamplingParams(n=1, temperature=0.0, max_new_tokens=7))
    # 4 student tokens, then 3 left of the budget of 7: the teacher writes 3 and the response ends.
    assert len(a.token_ids) == 7 and a.meta["teacher_tokens"] == 3 and a.finish_reason == "length"


def test_calls_beyond_the_limit_stay_text_and_the_student_goes_on(tok):
    script = "is <call> 1 </call> <call> 1 </call> <call> 1 </call> <call> 1 </call> x ."
    rollout, teacher, _ = _relay(tok, {"1": script}, max_calls=3)
    (a,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert a.meta["calls"] == 3 and a.meta["teacher_tokens"] == 3 and a.meta["calls_over_limit"] == 1
    assert _words(tok, a.token_ids)[-5:] == ["<call>", "1", "</call>", "x", "."] and a.finish_reason == "stop"
    # Every teacher context is free of command tags, the earlier teacher spans included.
    assert all("<call>" not in s and "</call>" not in s for s in teacher.seen)
    assert teacher.seen[2].count(TEACHER_WORD) == 2


@pytest.mark.parametrize("script,malformed", [
    ("is <call> </call> x .", 1),          # no number
    ("is <call> 0 </call> x .", 1),        # n <= 0
    ("is <call> the </call> x .", 1),      # not a number
    ("is </call> x .", 1),                 # a close without an open
    ("is <call> 5 x .", 1),                # never closed (end of text)
    ("is <call> <call> 2 </call> x .", 1),  # the first open is never closed; the second call is fine
], ids=["empty", "zero", "word", "stray-close", "unterminated", "double-open"])
def test_malformed_commands_stay_text_and_are_counted(tok, script, malformed):
    rollout, teacher, _ = _relay(tok, {"1": script})
    (a,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert a.meta["malformed_calls"] == malformed
    student_words = [w for w, m in zip(_words(tok, a.token_ids), a.mask) if m]
    assert student_words == tok.convert_ids_to_tokens(tok(script, add_special_tokens=False)["input_ids"])
    assert a.finish_reason == "stop"
    assert a.meta["calls"] == (1 if "2" in script else 0)


def test_a_failed_teacher_call_fails_its_response_only(tok):
    """The teacher raises (as the OpenAI back end does once its retries are spent) for one row:
    that response ends as failed (empty text, so it scores 0; no loss), the others finish."""
    teacher = ToyTeacher(tok, fail_on="documents : 2")
    scripts = {"1": "is <call> 2 </call> x .", "2": "is <call> 2 </call> x .", "3": "is 5 ."}
    rollout, _, _ = _relay(tok, scripts, teacher=teacher)
    outs = [o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY)]
    assert [o.finish_reason for o in outs] == ["stop", "failed", "stop"]
    assert outs[1].text == "" and outs[1].meta["failed"] == 1 and set(outs[1].mask) == {0}
    assert outs[0].meta["teacher_tokens"] == 2 and outs[0].meta["failed"] == 0
    assert rollout.stats["failed"] == 1


def test_the_teacher_stopping_early_hands_control_back(tok):
    rollout, _, _ = _relay(tok, {"1": "is <call> 6 </call> x ."}, teacher=ToyTeacher(tok, stop_after=2))
    (a,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert a.meta["teacher_tokens"] == 2 and _words(tok, a.token_ids)[-2:] == ["x", "."]


def test_random_calls_spend_the_budget_at_seeded_positions(tok):
    rollout, teacher, _ = _relay(tok, {"1": "the answer is 7 , the answer is 7 ."}, protocol="relay_random",
                                 calls=2, call_tokens=3, position_range=6)
    (a,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert a.meta["calls"] == 2 and a.meta["teacher_tokens"] == 6
    student_words = [w for w, m in zip(_words(tok, a.token_ids), a.mask) if m]
    assert student_words == tok.convert_ids_to_tokens(tok("the answer is 7 , the answer is 7 .",
                                                          add_special_tokens=False)["input_ids"])
    (b,), = _relay(tok, {"1": "the answer is 7 , the answer is 7 ."}, protocol="relay_random", calls=2,
                   call_tokens=3, position_range=6)[0].run([_prompt(tok, "1")], GREEDY)
    assert b.mask == a.mask  # seeded: the same positions again


def test_a_student_that_never_calls_writes_what_the_plain_rollout_writes(tmp_path):
    """A real tiny model, sampled: relay decoding without a call is the plain rollout."""
    from steps.core.backends import TransformersBackend
    from steps.core.rollouts import make_rollout

    rows = examples(2, 1)
    path = tiny_model(tmp_path / "m", TINY_DENSE, rows)
    backend = TransformersBackend(str(path))
    prompts = [Prompt(messages=(), text=f"<user> documents : {r['question']} <assistant> ", key=r["id"]) for r in rows]
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=12, seed=3)
    plain = make_rollout("plain", backend).run(prompts, sampling)
    relay = make_rollout("relay", backend, teacher_backend_obj=ToyTeacher(backend.tokenizer)).run(prompts, sampling)
    assert [[c.token_ids for c in cs] for cs in relay] == [[c.token_ids for c in cs] for cs in plain]
    assert all(c.meta["calls"] == 0 and c.meta["student_decode_tflops"] > 0 for cs in relay for c in cs)



# --- a teacher behind an OpenAI-compatible completions endpoint (tests/openai_fake_server.py) -----

def _http_teacher(server, **kw):
    from steps.core.backend_openai import OpenAIBackend

    return OpenAIBackend(model="fake", base_url=server.base_url, use_chat=False, backoff_initial_s=0.01,
                         backoff_max_s=0.2, progress=False, **kw)


def test_an_http_teacher_that_errs_or_stalls_is_retried(tok, serve):
    server = serve(faults={0: "500", 1: "stall"}, stall_s=1.0)
    teacher = _http_teacher(server, request_timeout_s=0.3)
    rollout, _, _ = _relay(tok, {"1": "is <call> 4 </call> x ."}, teacher=teacher)
    (a,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert a.finish_reason == "stop" and a.meta["calls"] == 1 and a.meta["failed"] == 0
    assert _words(tok, a.token_ids)[-2:] == ["x", "."]
    assert teacher.stats.retries == 2 and server.posts == 3
    assert "<call>" not in server.bodies[-1]["prompt"] and server.bodies[-1]["max_tokens"] == 4


def test_an_http_teacher_that_finally_fails_fails_that_response_only(tok, serve):
    server = serve(faults=lambda n, body: "500" if "documents : 2 " in body.get("prompt", "") else None)
    teacher = _http_teacher(server, max_retries=1)
    scripts = {"1": "is <call> 2 </call> x .", "2": "is <call> 2 </call> x .", "3": "is <call> 3 </call> x ."}
    rollout, _, _ = _relay(tok, scripts, teacher=teacher)
    outs = [o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY)]
    assert [o.finish_reason for o in outs] == ["stop", "failed", "stop"]
    assert [o.meta["failed"] for o in outs] == [0, 1, 0] and outs[1].text == ""
    # One request per distinct n on a server: n = 2 (rows 1, 2) and n = 3 (row 3).
    assert sorted({b["max_tokens"] for b in server.bodies}) == [2, 3]



def test_a_chat_endpoint_teacher_is_refused_at_once(tok, serve):
    from steps.core.backend_openai import OpenAIBackend

    teacher = OpenAIBackend(model="fake", base_url=serve().base_url, progress=False)  # use_chat defaults to true
    with pytest.raises(ValueError, match="use_chat: false"):
        _relay(tok, {"1": "x"}, teacher=teacher)


# --- the difficulty-aware reward (steps/core/rewards/relay.py) ---------------------------------

RIGHT, WRONG = "the answer is kestria .", "the answer is sarnia ."
CALLED_RIGHT = "the answer is <call> 2 </call> kestria ."   # the tags never spoil the answer

# One query group per block; ratio = teacher tokens / total tokens.
#  group | completion    | teacher/total | reward  | why
#  ----- | ------------- | ------------- | ------- | -----------------------------------------
#  A     | right         |    0 / 10     |   1.5   | someone solved it alone: correct, no call
#  A     | right (tags)  |    2 / 10     |   0.8   |   correct with a call: 1 - ratio
#  A     | wrong         |    0 / 10     |   0.0   |   wrong, no call
#  A     | wrong         |    5 / 10     |   0.0   |   wrong, with a call
#  B     | right (tags)  |    4 / 10     |   0.6   | solved only with a call: correct, call: 1 - ratio
#  B     | wrong         |    0 / 10     |  -1.0   |   wrong without a call
#  B     | wrong         |    3 / 10     |   0.0   |   wrong with a call
#  C     | wrong         |    3 / 10     |   0.3   | nobody solved it: a call earns its ratio
#  C     | wrong         |    0 / 10     |   0.0   |   no call: 0
TABLE = [
    ("A", CALLED_RIGHT.replace("<call> 2 </call> ", ""), 0, 10, 1.5),
    ("A", CALLED_RIGHT, 2, 10, 0.8),
    ("A", WRONG, 0, 10, 0.0),
    ("A", WRONG, 5, 10, 0.0),
    ("B", CALLED_RIGHT, 4, 10, 0.6),
    ("B", WRONG, 0, 10, -1.0),
    ("B", WRONG, 3, 10, 0.0),
    ("C", WRONG, 3, 10, 0.3),
    ("C", WRONG, 0, 10, 0.0),
]


@pytest.mark.parametrize("group", ["A", "B", "C"])
def test_difficulty_reward_table_one_group_at_a_time(group):
    from steps.core.rewards.relay import make_relay_difficulty

    rows = [r for r in TABLE if r[0] == group]
    fn = make_relay_difficulty()
    out = fn([r[1] for r in rows], answers=[["kestria"]] * len(rows), teacher_tokens=[r[2] for r in rows],
             total_tokens=[r[3] for r in rows])
    assert out == pytest.approx([r[4] for r in rows])


def test_difficulty_reward_flags_are_per_query_group_not_per_batch():
    """The three groups scored in one call (as the trainer calls it: one batch, several prompts):
    each row still gets its own group's case. The reference computes the flags over the batch,
    which would give B's wrong-without-call 0 (not -1) and C's call 0 (not its ratio): A's
    unaided solve would set the flag for all."""
    from steps.core.rewards.relay import make_relay_difficulty

    fn = make_relay_difficulty()
    out = fn([r[1] for r in TABLE], prompts=[f"prompt {r[0]}" for r in TABLE], answers=[["kestria"]] * len(TABLE),
             external_tokens=[r[2] for r in TABLE], policy_tokens=[r[3] - r[2] for r in TABLE])
    assert out == pytest.approx([r[4] for r in TABLE])
    batch_level = fn([r[1] for r in TABLE], answers=[["kestria"]] * len(TABLE),
                     teacher_tokens=[r[2] for r in TABLE], total_tokens=[r[3] for r in TABLE])
    assert batch_level[5] == 0.0 and batch_level[7] == 0.0  # what batch-level flags would give


def test_difficulty_reward_runs_from_the_command_line(tmp_path):
    import json
    import subprocess
    import sys

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": f"r{i}", "completion": r[1], "answers": ["kestria"], "teacher_tokens": r[2],
                                        "total_tokens": r[3], "group": r[0]}) + "\n" for i, r in enumerate(TABLE)))
    proc = subprocess.run([sys.executable, "-m", "steps.core.rewards", "score", "--reward", "relay_difficulty",
                           str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["reward"] for line in proc.stdout.splitlines()] == pytest.approx([r[4] for r in TABLE])


def test_the_policy_loss_has_zero_gradient_on_teacher_tokens(tmp_path, monkeypatch):
    """One GRPO step through the shared trainer with teacher spans in every rollout: the gradient
    of TRL's loss with respect to each completion token's log-probability is exactly 0 on the
    teacher's tokens and not 0 on the student's."""
    from transformers import AutoTokenizer

    from steps.core import rewards, training
    from steps.core.rl import RLConfig, train_rl

    seen = record_loss_gradients(monkeypatch)
    monkeypatch.setitem(rewards.REWARDS, "test_varied", lambda: lambda completions, **_: [float(len(c) % 7)
                                                                                          for c in completions])
    rows = examples(2, 2)
    policy = tiny_model(tmp_path / "policy", TINY_DENSE, rows)
    tok = AutoTokenizer.from_pretrained(policy)
    cfg = RLConfig(rewards={"test_varied": {}}, protocol="relay_random",
                   protocol_options={"calls": 2, "call_tokens": 3, "position_range": 6,
                                     "teacher_backend_obj": ToyTeacher(tok)},
                   num_generations=4, prompts_per_step=2, max_steps=1, max_completion_length=14, learning_rate=1e-3)
    train_rl(cfg, training.prompt_rows(rows, tok), str(policy), tmp_path / "out")
    assert seen and "grad" in seen[0]
    grad, mask, owner = seen[0]["grad"], seen[0]["mask"], seen[0]["owner"]
    teacher = (mask == 1) & (owner == 0)
    student = (mask == 1) & (owner == 1)
    assert teacher.sum() > 0 and student.sum() > 0
    assert (grad[teacher] == 0).all()
    assert (grad[student] != 0).any()


# --- the stage (steps/relay.py) -----------------------------------------------------------------

def test_warmup_inserts_zero_to_three_commands_and_keeps_the_sample():
    import random

    from steps.relay import insert_commands

    counts = set()
    for seed in range(60):
        ids = list(range(100, 110))
        out = insert_commands(ids, lambda n: [-1, n, -2], random.Random(seed), 3, (1, 16))
        k = out.count(-1)
        counts.add(k)
        assert [t for t in out if t >= 100] == ids                      # the sample itself, in order
        assert all(1 <= out[i + 1] <= 16 and out[i + 2] == -2 for i, t in enumerate(out) if t == -1)
    assert counts == {0, 1, 2, 3}


def test_relay_stage_filters_warms_up_and_trains_with_relay_decoding(tmp_path):
    """The whole stage on tiny models: the filter's log, the command tags added to the word-level
    vocabulary (and spelled as single tokens), the warm-up model, the GRPO model and its log."""
    from transformers import AutoTokenizer

    from steps.core.rollouts.relay import release_teacher
    from steps.relay import RelayConfig, train_relay

    rows = examples(3, 2)
    rft = tiny_model(tmp_path / "rft", TINY_DENSE, rows)
    teacher = tiny_model(tmp_path / "teacher", TINY_DENSE, rows, seed=1)
    cfg = RelayConfig(max_steps=1, num_generations=2, prompts_per_step=2, max_prompts=4, max_completion_length=10,
                      beta=0.0, filter_samples=2, filter_min_pass_rate=0.0, warmup_samples=1, warmup_keep="all",
                      warmup_steps=1, warmup_batch_size=2, sample_max_new_tokens=8, learning_rate=1e-3)
    try:
        result = train_relay(cfg, rows, str(rft), str(teacher), tmp_path / "out")
    finally:
        release_teacher(cfg.teacher_spec(str(teacher)))
    m = result["metrics"]
    assert m["filter_prompts"] == 4 and m["filter_kept"] == 4 and m["command_tokens_added"] and m["steps"] == 1
    assert (tmp_path / "out/filter.jsonl").exists() and (tmp_path / "out/warmup/model/config.json").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path / "out/model")
    assert len(tok("<call> 5 </call>", add_special_tokens=False)["input_ids"]) == 3
    assert any("reward" in h for h in result["history"])


def test_the_warmup_call_tokens_range_is_checked():
    from steps.relay import RelayConfig

    with pytest.raises(ValueError, match="warmup_call_tokens"):
        RelayConfig(warmup_call_tokens=(5, 2))
