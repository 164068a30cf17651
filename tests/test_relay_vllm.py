"""RelayLLM's relay decoding end to end with a real vLLM server as the teacher (completions endpoint).

The server and its model are tests/test_vllm.py's (a tiny Qwen3 with a byte-level tokenizer, the
CPU build in `.venv-vllm`): its vocabulary is not the student's, so what the teacher writes is
tokenised again by the student's tokenizer, as with any real pair of models. The student is the
scripted one of tests/test_relay.py, so that it calls at a known place; its command ends its
script, so that it stops when control comes back whatever the teacher wrote.
"""
from __future__ import annotations

import pytest

from tests.test_relay import GREEDY, _prompt, _relay, _words, tok  # noqa: F401 - tok is a fixture
from tests.test_vllm import SERVED, VLLM_PY, server  # noqa: F401 - server is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not VLLM_PY.exists(), reason="`make install-vllm` creates .venv-vllm")]


def test_relay_decoding_with_a_vllm_server_as_the_teacher(tok, server):  # noqa: F811
    from steps.core.backend_openai import OpenAIBackend

    teacher = OpenAIBackend(model=SERVED, base_url=server.url, use_chat=False, concurrency=4, progress=False)
    scripts = {"1": "the answer is <call> 5 </call>", "2": "is <call> 3 </call>", "3": "the answer is 7 ."}
    rollout, _, _ = _relay(tok, scripts, teacher=teacher)
    outs = [o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY)]
    assert [o.finish_reason for o in outs] == ["stop", "stop", "stop"]
    assert [o.meta["calls"] for o in outs] == [1, 1, 0] and not any(o.meta["failed"] for o in outs)
    assert teacher.stats.http_requests == 2  # one request per call
    assert outs[0].meta["teacher_tokens"] > 0 and outs[0].mask[-1] == 0  # the teacher's text closes the response
    for o, script in zip(outs, scripts.values()):
        student = [w for w, m in zip(_words(tok, o.token_ids), o.mask) if m]
        assert student == tok.convert_ids_to_tokens(tok(script, add_special_tokens=False)["input_ids"])
        assert o.meta["teacher_tokens"] == len(o.mask) - sum(o.mask)
