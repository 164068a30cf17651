"""Several servers behind the OpenAI back end (steps.core.server_pool), against real HTTP servers:
a server killed mid-run loses and duplicates nothing and the survivor does the rest; least
outstanding requests spreads the load by speed; a server that comes back is re-admitted; one
that passes its health check but fails every request is taken out; when all are down the call
fails in bounded time, naming them."""
from __future__ import annotations

import time

import pytest

from steps.core.backend_openai import BackendError, OpenAIBackend
from steps.core.backends import SamplingParams, derive_seed
from steps.core.io import read_json, read_jsonl, write_json, write_jsonl
from steps.core.prompts import Prompt, messages
from tests.helpers import examples, free_port, when

FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.2, "progress": False}


def chat_prompts(rows: list[dict]) -> list[Prompt]:
    return [Prompt(messages=tuple(messages(e)), text="", key=e["id"]) for e in rows]


def test_a_server_killed_mid_run_loses_and_duplicates_nothing(serve, serve_process, tmp_path):
    """The sample stage over two servers; one is SIGKILLed with requests in flight. Every
    candidate is written once, the survivor served everything the dead one did not, and
    stats.json says how many requests moved."""
    from steps.sample import SampleConfig, generate

    doomed = serve_process(latency_s=0.1)
    survivor = serve(latency_s=0.1)
    rows = examples(9, 9)
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_json(tmp_path / "models.json", {"teacher": "fake"})
    cfg = SampleConfig(backend="openai", k=2, shard_size=6, seed=4,
                       backend_options={"base_url": [doomed.base_url, survivor.base_url], "concurrency": 6, **FAST})
    # Both take requests from the start (least outstanding); the kill comes after a few rounds.
    killer = when(lambda: survivor.posts >= 6, doomed.kill)
    t0 = time.perf_counter()
    st = generate(cfg, str(tmp_path / "train.jsonl"), str(tmp_path / "models.json"), tmp_path / "out")
    print(f"\n36 requests over 2 servers, one killed: {time.perf_counter() - t0:.2f} s")
    killer.join()
    out = read_jsonl(tmp_path / "out/candidates.jsonl")
    keys = [(r["id"], r["sample_idx"]) for r in out]
    assert len(keys) == len(set(keys)) == 36 and set(keys) == {(e["id"], j) for e in rows for j in range(2)}
    assert all(f"seed {derive_seed(4, r['id'], r['sample_idx'])} " in r["completion"] for r in out)
    b = st["backend"]
    dead, alive = b["servers"][doomed.base_url], b["servers"][survivor.base_url]
    assert b["servers_went_down"] == [doomed.base_url] and dead["went_down"] == 1 and not dead["up"]
    assert 1 <= dead["moved_off"] <= 6 and b["requests_moved"] == dead["moved_off"]  # what was in flight
    assert dead["served"] >= 1 and dead["served"] + alive["served"] == 36  # each request delivered once
    assert survivor.posts == alive["sent"] == alive["served"] == 36 - dead["served"]  # the survivor did the rest
    assert read_json(tmp_path / "out/stats.json")["backend"] == b


def test_least_outstanding_requests_spreads_load_by_speed(serve):
    """Two live servers: as fast as each other, they share the work; one much slower holds
    its requests longer and gets far fewer (a round robin would give each half)."""
    prompts, sampling = chat_prompts(examples(10, 0)), SamplingParams(n=4)
    a, b = serve(latency_s=0.02), serve(latency_s=0.02)
    backend = OpenAIBackend(model="fake", base_url=[a.base_url, b.base_url], concurrency=4, **FAST)
    backend.generate(prompts, sampling)
    assert a.posts + b.posts == 40 and 14 <= a.posts <= 26, (a.posts, b.posts)
    assert a.max_in_flight <= 3 and b.max_in_flight <= 3  # 4 in flight, spread
    fast, slow = serve(latency_s=0.01), serve(latency_s=0.15)
    backend = OpenAIBackend(model="fake", base_url=[slow.base_url, fast.base_url], concurrency=4, **FAST)
    backend.generate(prompts, sampling)
    assert fast.posts + slow.posts == 40 and fast.posts >= 3 * slow.posts > 0, (fast.posts, slow.posts)
    s = backend.stats.servers
    assert (s[fast.base_url].served, s[slow.base_url].served) == (fast.posts, slow.posts)
    assert backend.stats.requests_moved == 0 and backend.stats.servers_went_down == []


def test_a_server_that_comes_back_is_readmitted(serve):
    """One server is down at the start (nothing listens on its port): the start check takes it
    out; it comes up mid-run, passes a re-check and gets requests again."""
    port = free_port()
    live = serve(latency_s=0.05)
    late: list = []
    backend = OpenAIBackend(model="fake", base_url=[f"http://127.0.0.1:{port}/v1", live.base_url], concurrency=2,
                            **FAST)
    starter = when(lambda: live.posts >= 6, lambda: late.append(serve(latency_s=0.05, port=port)))
    outs = backend.generate(chat_prompts(examples(10, 0)), SamplingParams(n=4))
    starter.join()
    assert all(len(cs) == 4 for cs in outs)
    back = backend.stats.servers[late[0].base_url]
    assert back.went_down == 1 and back.readmitted == 1 and back.up and back.moved_off == 0
    assert "ClientConnectorError" in back.why_down
    assert late[0].posts == back.served > 0 and live.posts + late[0].posts == 40


def test_a_server_that_fails_every_request_is_taken_out(serve):
    """It answers its health check (GET /v1/models) yet fails every POST with a 500: after
    max_retries + 1 failures in a row it is marked down, and nothing fails."""
    broken, good = serve(faults=lambda n, body: "500"), serve(latency_s=0.01)
    backend = OpenAIBackend(model="fake", base_url=[broken.base_url, good.base_url], concurrency=4, max_retries=2,
                            **FAST)
    outs = backend.generate(chat_prompts(examples(6, 0)), SamplingParams(n=4))
    assert all(len(cs) == 4 for cs in outs)
    s = backend.stats.servers[broken.base_url]
    assert s.served == 0 and s.went_down >= 1 and "requests failed in a row" in s.why_down
    assert backend.stats.servers[good.base_url].served == good.posts == 24


def test_a_retry_goes_to_a_server_the_request_has_not_failed_on(serve):
    """A server that fails fast has the fewest requests outstanding, so least-outstanding alone
    would send a request's retries back to it (and, re-admitted between failures, it could
    spend all of them: CI saw exactly that). The retry goes to the other server instead: the
    broken one sees one attempt, is never marked down, and the busy one serves both."""
    broken, busy = serve(faults=lambda n, body: "500"), serve(latency_s=0.3)
    backend = OpenAIBackend(model="fake", base_url=[broken.base_url, busy.base_url], concurrency=2, max_retries=2,
                            **FAST)
    outs = backend.generate(chat_prompts(examples(2, 0)), SamplingParams(n=1))
    assert all(len(cs) == 1 for cs in outs)
    s = backend.stats.servers
    assert broken.posts == s[broken.base_url].sent == 1 and s[broken.base_url].went_down == 0
    assert busy.posts == s[busy.base_url].served == 2


def test_every_server_down_fails_in_bounded_time_naming_them(serve_process):
    """Both servers are killed mid-run: the call waits all_down_timeout_s for one to come back,
    re-checking with back-off, then fails with an error that names both; never a hang."""
    a, b = serve_process(latency_s=0.05), serve_process(latency_s=0.05)
    backend = OpenAIBackend(model="fake", base_url=[a.base_url, b.base_url], concurrency=2,
                            all_down_timeout_s=1.0, **FAST)
    got: list[int] = []

    def on_batch(idx, _comps):
        got.extend(idx)
        if len(got) == 1:
            a.kill(), b.kill()

    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="every server is down") as e:
        backend.generate(chat_prompts(examples(10, 0)), SamplingParams(n=2), on_batch=on_batch)
    elapsed = time.perf_counter() - t0
    assert a.base_url in str(e.value) and b.base_url in str(e.value) and "all_down_timeout_s=1" in str(e.value)
    assert 1.0 <= elapsed < 4.0, elapsed
    assert set(backend.stats.servers_went_down) == {a.base_url, b.base_url}
    # At the start too: nothing listening at all.
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match="every server is down"):
        OpenAIBackend(model="fake", base_url=[f"http://127.0.0.1:{free_port()}/v1"], all_down_timeout_s=0.5,
                      **FAST).generate(chat_prompts(examples(1, 0)), SamplingParams(n=1))
    assert time.perf_counter() - t0 < 3.0


def test_base_url_list_is_checked_with_the_params_key(tmp_path):
    from steps.core.config import ConfigError, load_config
    from steps.sample import SampleConfig

    expected = r"section 'sample': backend_options\.base_url: expected str or list\[str\], got "
    for value in ("[http://a/v1, 5]", "{a: 1}"):
        (tmp_path / "params.yaml").write_text(f"base: {{seed: 0}}\nsample: {{backend: openai, backend_options: "
                                              f"{{base_url: {value}}}}}\n")
        with pytest.raises(ConfigError, match=expected):
            load_config(SampleConfig, "sample", tmp_path / "params.yaml")
    with pytest.raises(ValueError, match="listed twice"):
        OpenAIBackend(model="m", base_url=["http://a/v1", "http://a/v1/"])


def test_the_judge_stage_takes_a_list_of_servers(serve, ecommerce_example):
    """The LLM judge gets several servers from the back end, through its params (`judge.options`)."""
    from steps.judge import JudgeConfig
    from steps.judge import judge as judge_stage

    a, b = serve(latency_s=0.02), serve(latency_s=0.02)
    responses = [f"the answer is the tolka lamp is {w} . the tolka lamp is made of glass ."
                 for w in ("green", "glass", "made of glass", "green and made of glass")]
    cands = [{"id": "e1", "dataset": "ecommerce", "sample_idx": j, "completion": r, "thinking": "", "response": r,
              "completion_tokens": 5, "finish_reason": "stop", "model": "fake"} for j, r in enumerate(responses)]
    cfg = JudgeConfig(kind="llm", options={"model": "fake", "base_url": [a.base_url, b.base_url], "concurrency": 2,
                                           **FAST})
    judged, kept, st = judge_stage(cfg, [ecommerce_example], cands)
    assert len(kept) == len(judged) == 4 and a.posts + b.posts == 4 and a.posts >= 1 and b.posts >= 1
    # stats.json says which server judged what, as the sample stage's does
    servers = st["backend"]["servers"]
    assert {servers[a.base_url]["served"], servers[b.base_url]["served"]} == {a.posts, b.posts}
    assert st["backend"]["requests_moved"] == 0
