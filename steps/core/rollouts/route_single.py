"""route_member and route_random: Router-R1's comparison rows, one model of the pool answering alone.

`route_member` (option `member`): that member answers the whole question (the row's prompt, in
the member's own chat template) in one call; `route_random`: a member drawn uniformly per prompt
(seeded by the prompt's key) does. Same pool options and the same per-response accounting as the
routed rollout (steps/core/rollouts/router.py): `calls`, `calls_<member>`, `tokens_<member>`,
`cost`, `reward_columns.cost`, and `response` (the member's response, as its plain row's). The
row's own model is not used (its path gives the DVC dependency); every token is the member's,
mask 0.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from steps.core import prompts as P
from steps.core.backends import SamplingParams, derive_seed
from steps.core.rollouts import RolloutCompletion
from steps.core.rollouts.router import member_backend, member_price, parse_pool, release_members


class SingleCallRollout:
    """One member answers the whole question in one call: `member` fixed, or drawn per prompt."""

    def __init__(self, backend: Any, pool: Sequence[dict[str, Any]] = (), member: str | None = None,
                 member_max_new_tokens: int | None = None, member_temperature: float | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, member_backends: dict[str, Any] | None = None,
                 **_unused: Any):
        self.backend, self.pool = backend, parse_pool(pool)
        if member is not None and member not in {m.name for m in self.pool}:
            raise ValueError(f"route_member: no member {member!r} in the pool {[m.name for m in self.pool]}")
        self.member = member
        self.members = {m.name: (member_backends or {}).get(m.name) or member_backend(m) for m in self.pool}
        self.prices = {m.name: member_price(m, self.members[m.name]) for m in self.pool}
        self.max_new, self.temperature = member_max_new_tokens, member_temperature
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def _pick(self, prompt: P.Prompt, sampling: SamplingParams) -> str:
        if self.member is not None:
            return self.member
        return random.Random(derive_seed(sampling.seed, prompt.key, "route-random")).choice([m.name for m in self.pool])

    def run(self, prompts: Sequence[P.Prompt], sampling: SamplingParams, on_batch=None) -> list[list[RolloutCompletion]]:
        sp = SamplingParams(n=sampling.n, temperature=sampling.temperature if self.temperature is None else self.temperature,
                            top_p=sampling.top_p, max_new_tokens=self.max_new or sampling.max_new_tokens, seed=sampling.seed)
        picks = [self._pick(p, sampling) for p in prompts]
        results: list[list[RolloutCompletion]] = [[] for _ in prompts]
        for name in dict.fromkeys(picks):
            idx = [i for i, n in enumerate(picks) if n == name]
            backend = self.members[name]
            mtok = getattr(backend, "tokenizer", None)
            member_prompts = [P.Prompt(messages=prompts[i].messages, key=prompts[i].key, meta=prompts[i].meta,
                                       text=mtok.apply_chat_template(list(prompts[i].messages), tokenize=False,
                                                                     add_generation_prompt=True,
                                                                     **self.chat_template_kwargs)
                                       if mtok is not None and prompts[i].messages else prompts[i].text)
                              for i in idx]
            for i, cs in zip(idx, backend.generate(member_prompts, sp), strict=True):
                results[i] = [self._convert(c, name) for c in cs]
            if on_batch:
                on_batch(idx, [results[i] for i in idx])
        return results

    def _convert(self, c: Any, name: str) -> RolloutCompletion:
        tok = self.backend.tokenizer
        ids = tuple(tok(c.text, add_special_tokens=False)["input_ids"])
        meta: dict[str, Any] = {"calls": 1, "rounds": 1, "failed_calls": 0,
                                **{f"calls_{m.name}": int(m.name == name) for m in self.pool},
                                **{f"tokens_{m.name}": int(c.completion_tokens) * (m.name == name) for m in self.pool},
                                "cost": int(c.completion_tokens) * self.prices[name] / 1e6}
        meta["reward_columns"] = {"cost": meta["cost"]}
        return RolloutCompletion(text=c.text, token_ids=ids, mask=(0,) * len(ids), prompt_tokens=c.prompt_tokens,
                                 finish_reason=c.finish_reason, latency_s=c.latency_s, meta=meta,
                                 response=P.split_completion(c.text)[1])

    def close(self) -> None:
        self.backend.close()
        release_members(self.pool)


PROTOCOLS = {
    "route_member": lambda backend, **o: SingleCallRollout(backend, **o),
    "route_random": lambda backend, **o: SingleCallRollout(backend, **{**o, "member": None}),
}
