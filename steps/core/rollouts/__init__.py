"""Rollouts: the one place that turns prompts into completions, for evaluation and training alike.

A rollout takes rendered prompts and returns, per completion, a `RolloutCompletion`: the text,
the completion's token ids, a per-token ownership mask (1 = written by the policy, 0 = inserted
from outside: a teacher's relay tokens, a routed model's answer) and metadata (calls, external
tokens, cost). Evaluation decodes every model row through the rollout its `protocol` names
(steps.core.registry), and the RL trainer (steps.core.rl) trains through the same rollout via
TRL's `rollout_func`, with the mask as `env_mask`: inserted tokens never carry the policy's loss
and are never counted in a length reward, and a reported number and a trained behaviour come
from the same decoding.

Protocols are discovered: every module in this package that defines `PROTOCOLS = {name:
factory}` contributes its own, so a method adds `steps/core/rollouts/<method>.py` and edits
nothing shared. A factory is called as `factory(backend, **options)` with a generation back end
(steps.core.backends) over the policy.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from steps.core.backends import SamplingParams
from steps.core.plugins import discover
from steps.core.prompts import Prompt


@dataclass(frozen=True)
class RolloutCompletion:
    text: str                       # the whole completion, inserted text included
    token_ids: tuple[int, ...]      # completion tokens (end-of-sequence excluded)
    mask: tuple[int, ...]           # per token of token_ids: 1 = policy, 0 = inserted
    prompt_tokens: int
    finish_reason: str              # stop | length | failed
    latency_s: float = 0.0
    # calls, external tokens, cost, ...: numbers become report columns `extras/<key>`;
    # `reward_columns` reach the rewards in training (steps.core.rl)
    meta: dict[str, Any] = field(default_factory=dict)
    # The response the judge reads, for a protocol whose text is not `<think> T </think> R` (a
    # routed one); None: the text after the thinking (`response_text`).
    response: str | None = None

    @property
    def response_text(self) -> str:
        from steps.core.prompts import split_completion

        return self.response if self.response is not None else split_completion(self.text)[1]

    def __post_init__(self) -> None:
        if len(self.mask) != len(self.token_ids):
            raise ValueError(f"mask has {len(self.mask)} entries for {len(self.token_ids)} tokens")

    @property
    def policy_tokens(self) -> int:
        return sum(self.mask)

    @property
    def external_tokens(self) -> int:
        return len(self.mask) - sum(self.mask)


class Rollout(Protocol):
    # Chat-template switches this protocol needs when prompts are rendered (e.g. enable_thinking).
    chat_template_kwargs: dict[str, Any]

    def run(self, prompts: Sequence[Prompt], sampling: SamplingParams,
            on_batch: Callable[[list[int], list[list[RolloutCompletion]]], None] | None = None,
            ) -> list[list[RolloutCompletion]]:
        """`sampling.n` completions per prompt, in prompt order; `on_batch` as in the back ends."""
        ...

    def close(self) -> None: ...


PROTOCOLS: dict[str, Callable[..., Rollout]] = discover(__name__, __path__, "PROTOCOLS")


def make_rollout(protocol: str, backend: Any, **options: Any) -> Rollout:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown rollout protocol {protocol!r}; registered: {sorted(PROTOCOLS)}")
    return PROTOCOLS[protocol](backend, **options)
