"""GRPO rollouts on a vLLM server (TRL's server mode), without a GPU: the params key reaches
TRL's GRPOConfig, a CPU run is refused before anything loads, rollouts that need the in-process
model are refused with the reason, and the back end the rollout decodes through in server mode
speaks TRL's client protocol to a test double of `trl vllm-serve` over HTTP."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from steps.core.config import ConfigError, load_config
from steps.core.rl import TRLServerBackend, vllm_grpo_args
from steps.grpo import GrpoConfig

BASE = {"base": {"seed": 0}}
GRPO = {"rewards": {"correctness": {"weight": 1.0}}}


def _grpo(**section) -> GrpoConfig:
    return load_config(GrpoConfig, "grpo", "params.yaml", params={**BASE, "grpo": {**GRPO, **section}})


def test_the_params_key_reaches_trl_grpo_config(tmp_path):
    from trl import GRPOConfig

    cfg = _grpo(vllm={"mode": "server", "host": "10.0.0.7", "port": 8001, "group_port": 51300, "timeout_s": 60})
    args = vllm_grpo_args(cfg, cuda=True, section="grpo")
    assert args == {"use_vllm": True, "vllm_mode": "server", "vllm_server_host": "10.0.0.7", "vllm_server_port": 8001,
                    "vllm_group_port": 51300, "vllm_server_timeout": 60.0}
    trl_args = GRPOConfig(output_dir=str(tmp_path), bf16=False, report_to=[], **args)  # TRL's own field names
    assert (trl_args.use_vllm, trl_args.vllm_mode, trl_args.vllm_server_port) == (True, "server", 8001)
    url = vllm_grpo_args(_grpo(vllm={"mode": "server", "base_url": "http://rollouts:8000"}), cuda=True, section="grpo")
    assert url["vllm_server_base_url"] == "http://rollouts:8000" and "vllm_server_host" not in url
    assert vllm_grpo_args(_grpo(), cuda=True, section="grpo") == {}  # unset: in-process, as before
    assert vllm_grpo_args(_grpo(vllm={"mode": "off", "port": 9}), cuda=False, section="grpo") == {}


def test_a_cpu_run_is_refused_before_anything_loads(tmp_path):
    from steps.core.rl import train_rl

    cfg = _grpo(vllm={"mode": "server"})
    with pytest.raises(ConfigError, match=r"section 'grpo': vllm.mode: server needs CUDA"):
        vllm_grpo_args(cfg, cuda=False, section="grpo")
    # The real entry point, on this CPU machine: refused before the (absent) policy is read.
    with pytest.raises(ConfigError, match=r"section 'grpo': vllm.mode: server needs CUDA"):
        train_rl(cfg, [], str(tmp_path / "no-such-model"), tmp_path / "out")


def test_bad_keys_and_in_process_rollouts_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"section 'grpo': vllm: unknown key\(s\) \['prot'\]"):
        _grpo(vllm={"mode": "server", "prot": 8000})
    with pytest.raises(ConfigError, match=r"section 'grpo'.*vllm.mode: expected one of \['off', 'server'\]"):
        _grpo(vllm={"mode": "colocate"})
    with pytest.raises(ConfigError, match=r"protocol 'relay' drives the in-process policy model"):
        _grpo(vllm={"mode": "server"}, protocol="relay")


class _Serve(BaseHTTPRequestHandler):
    """`trl vllm-serve`'s side of TRL's VLLMClient.generate: POST /v1/completions with
    return_token_ids; choices prompt-major with prompt_token_ids and token_ids."""
    bodies: list[dict] = []
    tokenizer = None

    def log_message(self, *a):  # quiet
        pass

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).bodies.append(body)
        tok = type(self).tokenizer
        choices = []
        for i, prompt in enumerate(body["prompt"]):
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
            for j in range(body["n"]):
                words = tok(f"answer {i}-{j}", add_special_tokens=False)["input_ids"][: body["max_tokens"]]
                # Sample 0 stops (the end-of-sequence token ends it), sample 1 runs out of budget.
                gen = words + [tok.eos_token_id] if j == 0 else (words * 8)[: body["max_tokens"]]
                choices.append({"index": len(choices), "prompt_token_ids": ids, "token_ids": gen, "logprobs": None,
                                "text": tok.decode(gen)})
        payload = json.dumps({"choices": choices}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_the_server_back_end_decodes_through_trls_client():
    import requests
    from trl.generation.vllm_client import VLLMClient

    from steps.core.backends import SamplingParams
    from steps.core.prompts import Prompt
    from steps.core.rollouts import make_rollout
    from tests.helpers import byte_level_tokenizer

    tok = byte_level_tokenizer(["answer 0-0 answer 1-1 question one two"] * 4, vocab_size=300)
    _Serve.tokenizer, _Serve.bodies = tok, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        # TRL's client refuses to construct without vLLM installed (it is not, on this CPU
        # machine); its generate() is used as is, over HTTP, with the fields its __init__ sets.
        client = VLLMClient.__new__(VLLMClient)
        client.session, client.base_url, client.model = requests.Session(), f"http://127.0.0.1:{server.server_port}", "policy"
        rollout = make_rollout("plain", TRLServerBackend(client, tok))
        prompts = [Prompt(messages=(), text="question one", key="a"), Prompt(messages=(), text="question two", key="b")]
        outs = rollout.run(prompts, SamplingParams(n=2, temperature=0.7, max_new_tokens=6, seed=11))
    finally:
        server.shutdown()
    (body,) = _Serve.bodies  # one request for the whole batch
    assert body["prompt"] == ["question one", "question two"] and body["n"] == 2 and body["max_tokens"] == 6
    assert body["temperature"] == 0.7 and body["seed"] == 11 and body["return_token_ids"] is True
    assert [len(cs) for cs in outs] == [2, 2]
    stop, cut = outs[1]
    assert stop.finish_reason == "stop" and tok.eos_token_id not in stop.token_ids
    assert stop.text == "answer 1-0" and stop.mask == (1,) * len(stop.token_ids)
    assert cut.finish_reason == "length" and len(cut.token_ids) == 6
    assert stop.prompt_tokens == len(tok("question two", add_special_tokens=False)["input_ids"])


def test_the_gpu_preset_is_a_valid_grpo_section():
    import yaml

    from steps.core.config import load_params
    from tests.helpers import overlay

    preset = yaml.safe_load(open("infra/presets/grpo-vllm-server.yaml"))
    cfg = load_config(GrpoConfig, "grpo", "params.yaml", params=overlay(load_params("params.yaml"), preset))
    assert vllm_grpo_args(cfg, cuda=True, section="grpo")["vllm_server_port"] == 8000
    assert cfg.protocol == "plain" and cfg.vllm_server.timeout_s == 600
