"""The plain rollout: the policy alone writes every token (mask all ones). `think` and `no_think`
are the same decoding with the chat template's thinking switch set (Qwen3's `enable_thinking`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from steps.core.backends import Completion, SamplingParams
from steps.core.prompts import Prompt
from steps.core.rollouts import RolloutCompletion


class PlainRollout:
    def __init__(self, backend: Any, chat_template_kwargs: dict[str, Any] | None = None):
        self.backend = backend
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def _ids(self, c: Completion) -> tuple[int, ...]:
        ids = tuple(getattr(c, "token_ids", ()) or ())
        if ids or not c.completion_tokens:
            return ids
        tok = getattr(self.backend, "tokenizer", None)
        if tok is None:
            raise ValueError(f"the {self.backend.name} back end returned no token ids and has no tokenizer: "
                             "set backend_options.tokenizer so completions can be counted")
        return tuple(tok(c.text, add_special_tokens=False)["input_ids"])

    def convert(self, c: Completion) -> RolloutCompletion:
        ids = self._ids(c)
        return RolloutCompletion(text=c.text, token_ids=ids, mask=(1,) * len(ids), prompt_tokens=c.prompt_tokens,
                                 finish_reason=c.finish_reason, latency_s=c.latency_s,
                                 meta={"tokens_estimated": bool(getattr(c, "tokens_estimated", False))})

    def run(self, prompts: Sequence[Prompt], sampling: SamplingParams, on_batch=None):
        def forward(indices, comps):
            on_batch(indices, [[self.convert(c) for c in cs] for cs in comps])
        outs = self.backend.generate(prompts, sampling, on_batch=forward if on_batch else None)
        return [[self.convert(c) for c in cs] for cs in outs]

    def close(self) -> None:
        self.backend.close()


PROTOCOLS = {
    "plain": lambda backend, **o: PlainRollout(backend, **o),
    "think": lambda backend, **o: PlainRollout(backend, {**o.pop("chat_template_kwargs", {}), "enable_thinking": True}, **o),
    "no_think": lambda backend, **o: PlainRollout(backend, {**o.pop("chat_template_kwargs", {}), "enable_thinking": False}, **o),
}
