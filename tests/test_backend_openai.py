"""The OpenAI-compatible back end against a real HTTP server that misbehaves on script:
every fault kind is retried, nothing is lost or duplicated, the cache spares the network,
reasoning fields fold into `<think>`, and the sample stage survives SIGKILL five times."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from steps.core.backend_openai import BackendError, OpenAIBackend, RetryableError, parse_reply
from steps.core.backends import SamplingParams, derive_seed, make_backend
from steps.core.io import read_jsonl, write_json, write_jsonl
from steps.core.prompts import Prompt, messages, split_completion
from steps.core.schemas import CANDIDATES, EXAMPLES, validate
from tests.openai_fake_server import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
FAST = {"backoff_initial_s": 0.01, "backoff_max_s": 0.2, "progress": False}


def examples(n_musique: int = 3, n_ecommerce: int = 3) -> list[dict]:
    from steps.core import synth
    from steps.ingest import parse_ecommerce, parse_musique

    m, _ = parse_musique(list(enumerate(synth.musique_rows(n_musique, 0), 1)), "synthetic")
    return m + parse_ecommerce(list(enumerate(synth.ecommerce_rows(n_ecommerce, 0), 1)), "synthetic")


def chat_prompts(n: int) -> list[Prompt]:
    rows = examples(n, 0) if n else []
    return [Prompt(messages=tuple(messages(e)), text="", key=e["id"]) for e in rows]


def backend(server: FakeOpenAIServer, **kw) -> OpenAIBackend:
    return OpenAIBackend(model="fake", base_url=server.base_url, **{**FAST, **kw})


def texts(outs) -> list[list[str]]:
    return [[c.text for c in cs] for cs in outs]


def test_registered_by_name_and_n_seeded_requests_per_prompt(serve):
    server = serve()
    b = make_backend("openai", model="fake", base_url=server.base_url, **FAST)
    assert isinstance(b, OpenAIBackend) and b.tokenizer is None
    prompts = chat_prompts(4)
    batches: list[list[int]] = []
    outs = b.generate(prompts, SamplingParams(n=3, seed=7, max_new_tokens=100),
                      on_batch=lambda idx, comps: batches.append(idx) or [len(c) == 3 for c in comps])
    assert server.posts == 12 and sorted(i for b_ in batches for i in b_) == [0, 1, 2, 3]
    for p, cs in zip(prompts, outs):
        for j, c in enumerate(cs):  # each sample is its own request with its own derived seed
            assert f"seed {derive_seed(7, p.key, j)} " in c.text
            assert c.finish_reason == "stop" and c.completion_tokens == len(c.text.split()) - 2  # tags are not counted
            assert c.prompt_tokens > 0
    assert len({b_["seed"] for b_ in server.bodies}) == 12
    assert all(b_["max_tokens"] == 100 and "n" not in b_ for b_ in server.bodies)


def test_on_batch_fires_per_prompt_as_soon_as_its_samples_are_done(serve):
    server = serve(latency_s=0.05)
    seen: list[tuple[float, int]] = []
    t0 = time.perf_counter()

    def on_batch(idx, _comps):
        seen.extend((time.perf_counter() - t0, i) for i in idx)

    backend(server, concurrency=2).generate(chat_prompts(3), SamplingParams(n=2), on_batch=on_batch)
    # two requests at a time: prompt 0 is complete after the first round, long before the end
    assert [i for _, i in seen] == [0, 1, 2]
    assert seen[0][0] < seen[-1][0] - 0.08


@pytest.mark.parametrize("kind", ["429", "500", "stall", "malformed", "drop"])
def test_each_fault_kind_is_retried_and_results_are_unchanged(serve, kind):
    prompts, sampling = chat_prompts(4), SamplingParams(n=2, max_new_tokens=100)
    clean = texts(backend(serve()).generate(prompts, sampling))
    faulty = serve(faults={0: kind, 2: kind, 5: kind}, stall_s=2.0)
    b = backend(faulty, request_timeout_s=0.3)
    assert texts(b.generate(prompts, sampling)) == clean
    assert faulty.counts[f"fault:{kind}"] == 3 and faulty.posts == 8 + 3
    assert b.stats.retries == 3 and b.stats.http_requests == 11
    expected = {"429": "http 429", "500": "http 500", "stall": "timeout", "malformed": "malformed",
                "drop": "connection"}
    assert b.stats.by_error == {expected[kind]: 3}


def test_retry_after_header_is_honoured(serve):
    server = serve(faults={0: "429"}, retry_after_s=0.4)
    t0 = time.perf_counter()
    backend(server).generate(chat_prompts(1), SamplingParams(n=1))
    assert time.perf_counter() - t0 >= 0.4  # the back-off alone would wait ~0.01 s


def test_nothing_lost_or_duplicated_under_mixed_faults(serve):
    rng = random.Random(3)
    script = {n: rng.choice(["429", "500", "stall", "malformed", "drop"]) for n in range(120) if rng.random() < 0.3}
    prompts, sampling = chat_prompts(20), SamplingParams(n=3, seed=1)
    server = serve(faults=script, stall_s=2.0)
    calls: list[int] = []
    outs = backend(server, concurrency=8, request_timeout_s=0.3).generate(
        prompts, sampling, on_batch=lambda idx, comps: calls.extend(idx))
    assert sorted(calls) == list(range(20))  # every prompt delivered once
    for p, cs in zip(prompts, outs):
        assert [f"seed {derive_seed(1, p.key, j)} " in c.text for j, c in enumerate(cs)] == [True] * 3
    ok = sum(1 for n in range(server.posts) if n not in script)
    assert ok == 60  # exactly one successful request per (prompt, sample)


def test_gives_up_after_max_retries_with_a_clear_error(serve):
    server = serve(faults=lambda n, body: "500")
    with pytest.raises(BackendError, match=r"gave up after 3 attempts; last error: HTTP 500"):
        backend(server, max_retries=2).generate(chat_prompts(1), SamplingParams(n=1))
    assert server.posts == 3


def test_client_errors_are_not_retried(serve):
    server = serve()
    b = OpenAIBackend(model="fake", base_url=server.base_url.replace("/v1", "/nope"), **FAST)
    with pytest.raises(BackendError, match=r"/nope/chat/completions: HTTP 404 \(not retried"):
        b.generate(chat_prompts(1), SamplingParams(n=1))
    assert b.stats.http_requests == 1


def test_cache_hit_makes_zero_requests_even_on_another_server(serve, tmp_path):
    prompts, sampling = chat_prompts(5), SamplingParams(n=2)
    first = serve()
    b1 = backend(first, cache_dir=str(tmp_path / "cache"))
    outs = b1.generate(prompts, sampling)
    assert first.posts == 10
    replica = serve()  # the same model elsewhere: the key leaves the URL out
    b2 = backend(replica, cache_dir=str(tmp_path / "cache"))
    delivered: list[int] = []
    again = b2.generate(prompts, sampling, on_batch=lambda idx, _: delivered.extend(idx))
    assert replica.posts == 0 and b2.stats.http_requests == 0 and b2.stats.cache_hits == 10
    assert again == outs and sorted(delivered) == list(range(5))
    # more prompts: only the new ones travel; other sampling parameters are other entries
    b2.generate(chat_prompts(7), sampling)
    assert replica.posts == 4
    b2.generate(prompts, SamplingParams(n=2, temperature=0.5))
    assert replica.posts == 14
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_unreadable_cache_entry_is_requested_again(serve, tmp_path):
    server = serve()
    b = backend(server, cache_dir=str(tmp_path))
    outs = b.generate(chat_prompts(2), SamplingParams(n=1))
    entry = sorted(tmp_path.rglob("*.json"))[0]
    entry.write_text('{"version": 1, "reply": {"content": "trunc')
    assert texts(b.generate(chat_prompts(2), SamplingParams(n=1))) == texts(outs)
    assert server.posts == 3 and json.loads(entry.read_text())["reply"]["content"]


def test_reasoning_content_is_folded_into_think_tags(serve):
    prompts, sampling = chat_prompts(2), SamplingParams(n=1, max_new_tokens=100)
    inline = backend(serve()).generate(prompts, sampling)
    r1 = serve(reasoning_field=True)
    folded = backend(r1).generate(prompts, sampling)
    sent = r1.reply(0, "/v1/chat/completions", r1.bodies[0])["choices"][0]["message"]
    assert sent["reasoning_content"] and "<think>" not in sent["content"]  # the trace came apart
    for a, b in zip(inline, folded):
        assert b[0].text.startswith("<think> ") and " </think> the answer is " in b[0].text
        assert split_completion(a[0].text) == split_completion(b[0].text)
        assert a[0].completion_tokens == b[0].completion_tokens


def test_budget_ending_inside_the_reasoning_field_leaves_the_think_open(serve):
    out = backend(serve(reasoning_field=True)).generate(chat_prompts(1), SamplingParams(n=1, max_new_tokens=5))
    c = out[0][0]
    assert c.finish_reason == "length" and c.completion_tokens == 5
    assert c.text.startswith("<think>") and "</think>" not in c.text
    thinking, response = split_completion(c.text)
    assert response == "" and len(thinking.split()) == 5


@pytest.mark.parametrize("body,expect", [
    # (reply body) -> (text, finish_reason, completion_tokens); usage missing -> counted here (words
    # without a tokenizer) and marked estimated
    ({"choices": [{"message": {"content": "R"}, "finish_reason": "stop"}], "usage": {"completion_tokens": 4}},
     ("R", "stop", 4)),
    ({"choices": [{"message": {"content": "x y", "reasoning_content": "t"}, "finish_reason": "length"}]},
     ("<think> t </think> x y", "length", 3)),
    ({"choices": [{"message": {"content": "", "reasoning": "a b"}, "finish_reason": "length"}]},
     ("<think> a b", "length", 2)),
    ({"choices": [{"message": {"content": "<think> t </think> R", "reasoning_content": None},
                   "finish_reason": "eos"}]}, ("<think> t </think> R", "stop", 4)),
    ({"choices": [{"text": "T", "finish_reason": "max_tokens"}], "usage": {"completion_tokens": 9}},
     ("T", "length", 9)),
    ({"choices": [{"message": {"content": None}, "finish_reason": None}]}, ("", "stop", 0)),
])
def test_parse_reply_table(body, expect):
    r = parse_reply(body, 0.1)
    assert (r.text(), r.finish_reason, r.completion_tokens) == expect
    assert r.tokens_estimated == ("usage" not in body or "prompt_tokens" not in body["usage"])


@pytest.mark.parametrize("body,error", [
    ({"error": "x"}, RetryableError), ({"choices": []}, RetryableError), ({"choices": [{"index": 0}]}, RetryableError),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "abort"}]}, RetryableError),
    ({"choices": [{"message": {"content": "x"}, "finish_reason": "weird"}]}, BackendError),
])
def test_parse_reply_refuses_what_is_not_a_completion(body, error):
    with pytest.raises(error):
        parse_reply(body, 0.0)


def test_completions_endpoint_sends_rendered_text(serve):
    server = serve()
    b = backend(server, use_chat=False)
    out = b.generate([Prompt(messages=(), text="documents : a b question : where ? reply with", key="k")],
                     SamplingParams(n=2))
    assert server.counts["/v1/completions"] == 2 and all(c.text.startswith("<think>") for c in out[0])
    assert server.bodies[0]["prompt"].startswith("documents") and "messages" not in server.bodies[0]
    with pytest.raises(ValueError, match="use_chat=false sends rendered text.*tokenizer"):
        b.generate(chat_prompts(1), SamplingParams(n=1))


def test_chat_template_kwargs_and_extra_body_reach_the_server(serve):
    server = serve()
    b = backend(server, chat_template_kwargs={"enable_thinking": True, "x": 1}, extra_body={"top_k": 20})
    p = chat_prompts(1)[0]
    b.generate([Prompt(p.messages, "", p.key, meta={"chat_template_kwargs": {"enable_thinking": False}})],
               SamplingParams(n=1))
    body = server.bodies[0]
    assert body["chat_template_kwargs"] == {"enable_thinking": False, "x": 1} and body["top_k"] == 20


def test_concurrency_bound_and_rate_limit(serve):
    server = serve(latency_s=0.1)
    t0 = time.perf_counter()
    backend(server, concurrency=4).generate(chat_prompts(4), SamplingParams(n=4))
    elapsed = time.perf_counter() - t0
    assert server.max_in_flight <= 4 and elapsed < 16 * 0.1 * 0.6  # parallel, yet bounded
    limited = serve()
    t0 = time.perf_counter()
    backend(limited, concurrency=10, requests_per_second=20).generate(chat_prompts(5), SamplingParams(n=2))
    assert time.perf_counter() - t0 >= 9 / 20 * 0.95  # 10 starts spaced 50 ms apart


def test_callable_from_inside_a_running_event_loop(serve):
    server = serve()

    async def caller():
        return backend(server).generate(chat_prompts(1), SamplingParams(n=2))

    assert len(asyncio.run(caller())[0]) == 2


def test_sample_stage_with_the_openai_backend(serve, tmp_path):
    from steps.sample import SampleConfig, sample

    server = serve(reasoning_field=True)
    cfg = SampleConfig(backend="openai", k=2, shard_size=3, chat_template_kwargs={"enable_thinking": True},
                       backend_options={"base_url": server.base_url, **FAST})
    rows, _ = sample(cfg, examples(), "fake", tmp_path / "work")
    validate(rows, CANDIDATES, "candidates")
    assert len(rows) == 12 and all(r["thinking"] and r["response"].startswith("the answer is") for r in rows)
    assert all(b["chat_template_kwargs"] == {"enable_thinking": True} for b in server.bodies)


def _wait_for(pred, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_sample_stage_killed_five_times_loses_and_duplicates_nothing(serve, tmp_path):
    server = serve(latency_s=0.12)
    rows = examples(8, 8)
    validate(rows, EXAMPLES, "train.jsonl")
    write_jsonl(tmp_path / "data/ingest/train.jsonl", rows)
    write_json(tmp_path / "models.json", {"teacher": "fake", "student_base": "fake"})
    options = {"base_url": server.base_url, "concurrency": 2, "cache_dir": str(tmp_path / "cache"),
               "request_timeout_s": 10, "backoff_initial_s": 0.01}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"base": {"seed": 0},
         "sample": {"backend": "openai", "backend_options": options, "k": 3, "model": "fake", "shard_size": 4}}))
    cmd = [sys.executable, "-m", "steps.sample", "--params", "params.yaml", "--data", "data/ingest/train.jsonl",
           "--models", "models.json", "--out", "data/sample"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_TRACKING": "off"}
    rng = random.Random(0)
    for _ in range(5):
        log = (tmp_path / "stderr.log").open("w")
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=log)
        target = server.posts + rng.randint(1, 5)
        assert _wait_for(lambda: server.posts >= target or proc.poll() is not None, 60), "no requests arrived"
        time.sleep(rng.uniform(0.0, 0.15))  # anywhere in a request's life, a cache write or a shard write
        assert proc.poll() is None, f"ended before the kill: {(tmp_path / 'stderr.log').read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        for entry in (tmp_path / "cache").rglob("*.json"):  # no torn cache entry, ever
            json.loads(entry.read_text())
        for shard in (tmp_path / "data/sample/.resume").rglob("part-*.jsonl"):  # no torn shard
            assert shard.read_text().endswith("\n")
    assert not (tmp_path / "data/sample/candidates.jsonl").exists()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = read_jsonl(tmp_path / "data/sample/candidates.jsonl")
    validate(out, CANDIDATES, "candidates.jsonl")
    keys = [(r["id"], r["sample_idx"]) for r in out]
    assert len(keys) == len(set(keys)) == 48
    assert set(keys) == {(e["id"], j) for e in rows for j in range(3)}
    assert all(f"seed {derive_seed(0, r['id'], r['sample_idx'])} " in r["completion"] for r in out)
    # Kills lose at most the requests in flight (concurrency 2); everything else is re-used.
    assert server.posts <= 48 + 5 * 2


# --- issue 11: token counts without `usage`, and the key from the environment ------------------

def test_missing_usage_is_counted_with_the_local_tokenizer_and_said(serve, tmp_path, caplog):
    from transformers import AutoTokenizer

    from steps.core import modeling
    from steps.pretrain_demo import corpus_texts

    rows = examples(2, 0)
    modeling.build_tokenizer(corpus_texts(rows)).save_pretrained(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    server = serve(usage=False, reasoning_field=True)
    b = backend(server, tokenizer=str(tmp_path / "tok"))
    prompts = [Prompt(messages=tuple(messages(e)), text="", key=e["id"]) for e in rows]
    with caplog.at_level("WARNING"):
        out = b.generate(prompts, SamplingParams(n=2))
    count = lambda t: len(tok(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    for p, cs in zip(prompts, out):
        for c in cs:
            thinking, response = split_completion(c.text)
            assert c.tokens_estimated and c.completion_tokens == count(thinking) + count(response)
            assert c.prompt_tokens == count(tok.apply_chat_template(list(p.messages), tokenize=False,
                                                                    add_generation_prompt=True)) > 0
    assert "4 of 4 replies carried no usage; their token counts were estimated with the local tokenizer" in caplog.text
    assert b.stats.tokens_estimated == 4


def test_missing_usage_without_a_tokenizer_counts_words_and_says_so(serve, caplog):
    server = serve(usage=False)
    with caplog.at_level("WARNING"):
        out = backend(server).generate(chat_prompts(1), SamplingParams(n=3))
    assert all(c.tokens_estimated and c.completion_tokens == len(c.text.split()) and c.prompt_tokens > 0
               for c in out[0])
    assert "3 of 3 replies carried no usage" in caplog.text and "whitespace-separated words" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        served = backend(serve()).generate(chat_prompts(1), SamplingParams(n=1))
    assert not served[0][0].tokens_estimated and "usage" not in caplog.text


def test_the_api_key_comes_from_the_variable_params_name(serve, monkeypatch):
    server = serve()
    monkeypatch.setenv("TEAM_LLM_KEY", "sk-from-the-environment-0123456789")
    backend(server, api_key_env="TEAM_LLM_KEY").generate(chat_prompts(1), SamplingParams(n=1))
    assert server.authorizations == {"Bearer sk-from-the-environment-0123456789"}
    with pytest.raises(TypeError):
        backend(server, api_key="sk-literal")  # no literal key: params could carry it into dvc.lock
