"""Router-R1's routed decoding (steps/core/rollouts/router.py) on a scripted policy and toy members,
members behind the fault-injecting OpenAI server, and the information tokens in TRL's loss."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from steps.core.backends import Completion, SamplingParams
from steps.core.prompts import Prompt
from steps.core.rewards.router import format_violation
from steps.core.rollouts.router import ROUTER_TAGS, documents_span
from tests.helpers import TINY_DENSE, examples, record_loss_gradients, tiny_model

POOL = [{"name": "teacher", "price_per_million": 10.0, "descriptor": "strong and dear"},
        {"name": "student_base", "price_per_million": 1.0, "descriptor": "weak and cheap"},
        {"name": "rft", "price_per_million": 3.0, "descriptor": "in between"}]
NAMES = [m["name"] for m in POOL]
GREEDY = SamplingParams(n=1, temperature=0.0, max_new_tokens=80)


@pytest.fixture(scope="module")
def tok():
    from steps.core import modeling
    from steps.pretrain_demo import corpus_texts

    # the words of the scripts and of the rollout's error strings, beside the corpus's
    words = ("kestria dadada zono where oracle teacher hmm y b error there no model named pool unavailable try "
             "another write name query real search as")
    t = modeling.build_tokenizer([*corpus_texts(examples(3, 2)), words])
    t.add_tokens([*ROUTER_TAGS, "student_base", "rft"])
    t.padding_side = "left"
    return t


class ScriptedPolicy:
    """A causal LM stand-in: the next token is script[k], k = the tokens after `<assistant>` that
    are not inside an information block. Honours `generate`'s contract as the rollout uses it."""

    def __init__(self, tok, scripts: dict[str, str]):
        self.tok = tok
        self.scripts = {k: tok(v, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for k, v in scripts.items()}
        self.generation_config = SimpleNamespace(eos_token_id=tok.eos_token_id)
        self.open, self.close = (tok.convert_tokens_to_ids(t) for t in ("<information>", "</information>"))

    def _next(self, ids: list[int]) -> int:
        text = self.tok.decode(ids, skip_special_tokens=True)
        script = next(v for k, v in self.scripts.items() if f"documents : {k} " in text)
        after = ids[ids.index(self.tok.convert_tokens_to_ids("<assistant>")) + 1:]
        k, inside = 0, False
        for t in after:
            if t == self.open:
                inside = True
            elif t == self.close:
                inside = False
            elif not inside:
                k += 1
        return script[min(k, len(script) - 1)]

    def generate(self, input_ids, attention_mask, max_new_tokens, stopping_criteria, pad_token_id, eos_token_id, **_):
        import torch

        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids, attention_mask)]
        out = input_ids.clone()
        done = torch.zeros(len(rows), dtype=torch.bool)
        for _ in range(max_new_tokens):
            nxt = [pad_token_id if done[i] else self._next(r) for i, r in enumerate(rows)]
            for r, t in zip(rows, nxt):
                r.append(t)
            new = torch.tensor(nxt).unsqueeze(1)
            out = torch.cat([out, new], dim=1)
            done |= new.squeeze(1) == eos_token_id[0]
            done |= stopping_criteria[0](out, None)
            if done.all():
                break
        return out


class ToyMember:
    """Answers `the answer is <word> .` in `tokens` tokens; records its prompts; fails on request."""
    name = "toy"

    def __init__(self, tok, word: str, tokens: int = 5, fail: bool = False):
        self.tokenizer, self.word, self.tokens, self.fail = tok, word, tokens, fail
        self.seen: list[Prompt] = []
        self.batches: list[int] = []

    def generate(self, prompts, sampling, on_batch=None):
        self.batches.append(len(prompts))
        if self.fail:
            raise RuntimeError("HTTP 503 after retries")
        self.seen += prompts
        return [[Completion(text=f"<think> hmm </think> the answer is {self.word} .", completion_tokens=self.tokens,
                            finish_reason="stop", prompt_tokens=10)] for _ in prompts]

    def close(self):
        pass


def _rollout(tok, scripts, members=None, protocol="router", **options):
    from steps.core.rollouts import make_rollout

    policy = ScriptedPolicy(tok, scripts)
    backend = SimpleNamespace(name="transformers", model=policy, tokenizer=tok, device="cpu", batch_size=64,
                              model_name="scripted", _eos_ids=lambda: [tok.eos_token_id], close=lambda: None)
    members = members or {n: ToyMember(tok, w) for n, w in zip(NAMES, ["kestria", "sarnia", "dadada"])}
    return make_rollout(protocol, backend, pool=POOL, member_backends=members, **options), members


def _prompt(tok, key):
    msgs = ({"role": "user", "content": f"documents : {key} zono was born in dadada . question : where ? "
                                        "reply with : the answer is X ."},)
    return Prompt(messages=msgs, text=tok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True),
                  key=key)


def _info_words(tok, c):
    return [w for w, m in zip(tok.convert_ids_to_tokens(list(c.token_ids)), c.mask) if m == 0]


ONE_ROUND = ("<think> need the city </think> <search> rft : where was zono born ? </search> "
             "<think> dadada is in kestria </think> <answer> kestria </answer>")


def test_one_round_inserts_the_members_answer_with_mask_zero(tok):
    rollout, members = _rollout(tok, {"1": ONE_ROUND})
    (c,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert c.finish_reason == "stop" and c.text.endswith("</answer>")
    # the member's response only (its thinking dropped), wrapped, all of it mask 0
    assert _info_words(tok, c) == ["<information>", "the", "answer", "is", "dadada", ".", "</information>"]
    assert c.policy_tokens + c.external_tokens == len(c.token_ids) and c.meta["information_tokens"] == 7
    assert format_violation(c.text, NAMES) is None
    # the member got the example's documents and the query, in the pipeline's prompt format
    seen = members["rft"].seen[0]
    assert "documents : 1 zono was born in dadada ." in seen.messages[0]["content"]
    assert "question : where was zono born ?" in seen.messages[0]["content"]
    m = c.meta
    assert (m["calls"], m["calls_rft"], m["calls_teacher"], m["tokens_rft"], m["rounds"]) == (1, 1, 0, 5, 1)
    assert m["cost"] == pytest.approx(5 * 3.0 / 1e6) and m["reward_columns"] == {"cost": m["cost"]}
    assert c.response == c.response_text == "the answer is kestria ."


def test_the_policy_prompt_gets_the_routing_turn_with_the_pool(tok):
    rollout, _ = _rollout(tok, {"1": ONE_ROUND})
    p = rollout.routing_prompt(_prompt(tok, "1"))
    assert p.messages[0]["role"] == "system" and "rft : in between" in p.messages[0]["content"]
    assert rollout.routing_prompt(p) is p          # rendered once (the RL stage's prompts already have it)
    assert documents_span(p.text) == "1 zono was born in dadada ."


def test_waiting_queries_go_to_each_member_in_one_call(tok):
    scripts = {k: f"<think> a </think> <search> {name} : where is it ? </search> <think> b </think> <answer> x </answer>"
               for k, name in [("1", "rft"), ("2", "rft"), ("3", "teacher")]}
    rollout, members = _rollout(tok, scripts)
    outs = [o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY)]
    assert members["rft"].batches == [2] and members["teacher"].batches == [1] and members["student_base"].batches == []
    assert [o.meta["cost"] for o in outs] == pytest.approx([15e-6, 15e-6, 50e-6])


def test_an_unknown_member_and_a_malformed_search_get_an_error_and_the_rollout_goes_on(tok):
    scripts = {"1": "<think> a </think> <search> oracle : where ? </search> <think> b </think> <answer> x </answer>",
               "2": "<think> a </think> <search> where is it </search> <think> b </think> <answer> x </answer>"}
    rollout, members = _rollout(tok, scripts)
    a, b = (o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY))
    assert a.finish_reason == b.finish_reason == "stop"
    assert "no model named oracle" in a.text and a.meta["unknown_member_calls"] == 1 and a.meta["calls"] == 0
    assert b.meta["invalid_searches"] == 1 and b.meta["cost"] == 0.0
    assert format_violation(a.text, NAMES) == "unknown member" and format_violation(b.text, NAMES) == "query"
    assert all(m.batches == [] for m in members.values())


def test_a_member_that_stays_down_answers_with_an_error_and_is_counted(tok):
    members = {"teacher": ToyMember(tok, "k", fail=True), "student_base": ToyMember(tok, "s"), "rft": ToyMember(tok, "r")}
    scripts = {"1": "<think> a </think> <search> teacher : where ? </search> <think> b </think> <answer> x </answer>",
               "2": "<think> a </think> <search> rft : where ? </search> <think> b </think> <answer> y </answer>"}
    rollout, _ = _rollout(tok, scripts, members=members)
    a, b = (o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY))
    assert "teacher is unavailable" in a.text and a.meta["failed_calls"] == 1 and a.meta["calls"] == 0
    assert a.text.endswith("<answer> x </answer>") and a.meta["cost"] == 0.0
    assert b.meta["failed_calls"] == 0 and b.meta["calls_rft"] == 1
    assert rollout.stats["failed_calls"] == 1


def test_searches_beyond_max_rounds_end_the_response(tok):
    search = "<think> a </think> <search> student_base : where ? </search> "
    rollout, members = _rollout(tok, {"1": search * 4 + "<answer> x </answer>"}, max_rounds=2)
    (c,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert c.meta["calls"] == 2 and c.meta["calls_over_limit"] == 1 and c.finish_reason == "stop"
    assert c.text.endswith("</search>") and format_violation(c.text, NAMES) == "answer count"


def test_the_budget_counts_inserted_tokens(tok):
    rollout, _ = _rollout(tok, {"1": ONE_ROUND})
    (c,), = rollout.run([_prompt(tok, "1")], SamplingParams(n=1, temperature=0.0, max_new_tokens=16))
    assert len(c.token_ids) == 16 and c.finish_reason == "length"


def test_single_call_rows_one_member_alone_or_one_drawn_per_prompt(tok):
    members = {n: ToyMember(tok, w, tokens=t) for n, w, t in zip(NAMES, ["kestria", "sarnia", "dadada"], [7, 3, 5])}
    alone, _ = _rollout(tok, {}, members=members, protocol="route_member", member="teacher")
    (c,), = alone.run([_prompt(tok, "1")], GREEDY)
    assert c.meta["calls_teacher"] == 1 and c.meta["cost"] == pytest.approx(7 * 10.0 / 1e6)
    assert c.response == "the answer is kestria ." and c.policy_tokens == 0
    rand, _ = _rollout(tok, {}, members=members, protocol="route_random")
    outs = [o[0] for o in rand.run([_prompt(tok, str(k)) for k in range(30)], GREEDY)]
    picked = [next(n for n in NAMES if o.meta[f"calls_{n}"]) for o in outs]
    assert set(picked) == set(NAMES) and all(o.meta["calls"] == 1 for o in outs)
    again = [o[0] for o in rand.run([_prompt(tok, str(k)) for k in range(30)], GREEDY)]
    assert [next(n for n in NAMES if o.meta[f"calls_{n}"]) for o in again] == picked   # seeded per prompt


def test_pool_entries_are_checked():
    from steps.core.rollouts.router import parse_pool
    with pytest.raises(ValueError, match="one lower-case word"):
        parse_pool([{"name": "Big Model"}])
    with pytest.raises(ValueError, match="price_per_million"):
        parse_pool([{"name": "api", "backend": "openai", "model": "m"}])
    with pytest.raises(ValueError, match="distinct"):
        parse_pool([{"name": "a", "price_per_million": 1}, {"name": "a", "price_per_million": 1}])
    with pytest.raises(ValueError, match="unknown keys"):
        parse_pool([{"name": "a", "price": 1}])


# --- members behind an OpenAI-compatible endpoint (the fault-injecting server) -----------------

def _http_member(server, **kw):
    from steps.core.backend_openai import OpenAIBackend

    return OpenAIBackend(model="fake", base_url=server.base_url, backoff_initial_s=0.01, backoff_max_s=0.2,
                         progress=False, **kw)


def test_an_http_member_that_errs_stalls_or_garbles_is_retried(tok, serve):
    server = serve(faults={0: "500", 1: "stall", 2: "malformed"}, stall_s=1.0)
    member = _http_member(server, request_timeout_s=0.3)
    members = {"teacher": member, "student_base": ToyMember(tok, "s"), "rft": ToyMember(tok, "r")}
    rollout, _ = _rollout(tok, {"1": ONE_ROUND.replace("rft :", "teacher :")}, members=members)
    (c,), = rollout.run([_prompt(tok, "1")], GREEDY)
    assert c.meta["calls_teacher"] == 1 and c.meta["failed_calls"] == 0 and c.meta["tokens_teacher"] > 0
    assert member.stats.retries == 3 and server.posts == 4
    assert "where was zono born" in server.bodies[-1]["messages"][0]["content"]


def test_an_http_member_that_stays_down_answers_with_an_error(tok, serve):
    server = serve(faults=lambda n, body: "500")
    members = {"teacher": _http_member(server, max_retries=1), "student_base": ToyMember(tok, "s"),
               "rft": ToyMember(tok, "r")}
    scripts = {"1": ONE_ROUND.replace("rft :", "teacher :"), "2": ONE_ROUND}
    rollout, _ = _rollout(tok, scripts, members=members)
    a, b = (o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY))
    assert a.meta["failed_calls"] == 1 and "teacher is unavailable" in a.text and a.finish_reason == "stop"
    assert b.meta["failed_calls"] == 0 and b.meta["calls_rft"] == 1


# --- training: information tokens carry no gradient; the cost column reaches the rewards ---------

def test_information_tokens_carry_no_gradient_and_the_cost_reaches_the_rewards(tmp_path, monkeypatch):
    """One GRPO step through the shared trainer, every rollout with an information block: the
    gradient of TRL's loss with respect to each completion token's log-probability is exactly 0
    on the inserted tokens and not 0 on the policy's; the rewards get the rollout's `cost`."""
    from transformers import AutoTokenizer

    from steps.core import prompts as P
    from steps.core import rewards, rollouts
    from steps.core.rl import RLConfig, train_rl
    from steps.core.rollouts.router import RouterRollout, parse_pool, routing_messages
    from steps.router import add_routing_tokens

    costs = []
    seen = record_loss_gradients(monkeypatch)

    class ForcedPolicy(RouterRollout):
        """The real rollout (routing, insertion, mask) with the policy's segments forced: a tiny
        random model would never write a search."""
        def _policy_step(self, rows, sampling):
            for r in rows:
                seg = ("<think> a </think> <search> rft : where ? </search>" if r.segment == 0
                       else "<think> b </think> <answer> x </answer>")
                ids = self.tokenizer(seg, add_special_tokens=False)["input_ids"]
                r.ids += ids
                r.mask += [1] * len(ids)
                r.segment += 1
                if r.segment == 1:
                    r.pending = "rft : where ?"
                else:
                    r.finish = "stop"

    def make_recorder():
        def rec(completions, cost=None, **_):
            costs.extend(cost)
            return [float(i % 3) for i in range(len(completions))]  # varied within each group
        return rec

    monkeypatch.setitem(rewards.REWARDS, "test_cost_recorder", make_recorder)
    monkeypatch.setitem(rollouts.PROTOCOLS, "router_forced", lambda backend, **o: ForcedPolicy(backend, **o))
    rows = examples(2, 2)
    base = tiny_model(tmp_path / "base", TINY_DENSE, rows)
    policy, added = add_routing_tokens(str(base), tmp_path / "policy", NAMES, 0)
    assert added
    tok = AutoTokenizer.from_pretrained(policy)
    members = {n: ToyMember(tok, "kestria") for n in NAMES}
    cfg = RLConfig(rewards={"test_cost_recorder": {}}, protocol="router_forced",
                   protocol_options={"pool": POOL, "member_backends": members},
                   num_generations=4, prompts_per_step=2, max_steps=1, max_completion_length=40, learning_rate=1e-3)
    pool = parse_pool(POOL)
    prompts = [{**e, "prompt": tok.apply_chat_template(routing_messages(P.messages(e), pool, 4), tokenize=False,
                                                       add_generation_prompt=True)} for e in rows]
    train_rl(cfg, prompts, policy, tmp_path / "out")
    grad, mask, owner = seen[0]["grad"], seen[0]["mask"], seen[0]["owner"]
    inserted, written = (mask == 1) & (owner == 0), (mask == 1) & (owner == 1)
    assert inserted.sum() > 0 and written.sum() > 0
    assert (grad[inserted] == 0).all()
    assert (grad[written] != 0).any()
    assert costs == pytest.approx([5 * 3.0 / 1e6] * 8)
