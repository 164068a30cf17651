"""Router-R1's routed decoding end to end with a real vLLM server as a pool member (chat endpoint).

The server and its model are tests/test_vllm.py's (a tiny Qwen3 with a byte-level tokenizer, the
CPU build in `.venv-vllm`): its vocabulary is not the policy's, so its reply is tokenised again by
the policy's tokenizer, as with any real pool. The policy is the scripted one of
tests/test_router_rollout.py, so that it calls at known places.
"""
from __future__ import annotations

import pytest

from tests.test_router_rollout import GREEDY, ONE_ROUND, ToyMember, _prompt, _rollout, tok  # noqa: F401 - tok is a fixture
from tests.test_vllm import SERVED, VLLM_PY, server  # noqa: F401 - server is a fixture

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not VLLM_PY.exists(), reason="`make install-vllm` creates .venv-vllm")]


def test_routed_decoding_with_a_vllm_server_as_a_member(tok, server):  # noqa: F811
    from steps.core.backend_openai import OpenAIBackend

    teacher = OpenAIBackend(model=SERVED, base_url=server.url, concurrency=4, progress=False)
    members = {"teacher": teacher, "student_base": ToyMember(tok, "sarnia"), "rft": ToyMember(tok, "kestria")}
    to_teacher = ONE_ROUND.replace("rft :", "teacher :")
    scripts = {"1": to_teacher, "2": to_teacher, "3": "<think> a </think> <answer> x </answer>"}
    rollout, _ = _rollout(tok, scripts, members=members, member_max_new_tokens=16)
    outs = [o[0] for o in rollout.run([_prompt(tok, k) for k in scripts], GREEDY)]
    assert [o.finish_reason for o in outs] == ["stop", "stop", "stop"]
    assert [o.meta["calls_teacher"] for o in outs] == [1, 1, 0] and not any(o.meta["failed_calls"] for o in outs)
    assert teacher.stats.http_requests == 2
    for o in outs[:2]:
        assert 0 < o.meta["tokens_teacher"] <= 16 and o.meta["cost"] == pytest.approx(o.meta["tokens_teacher"] * 10.0 / 1e6)
        assert o.meta["information_tokens"] >= 2 and o.text.endswith("<answer> kestria </answer>")
    assert outs[2].meta["cost"] == 0.0
