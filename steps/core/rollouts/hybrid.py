"""Hybrid thinking's training rollouts: AdaptThink's forced halves and AdaCoT's masked decision.

The **decision token** is the first token after the thinking opener `<think>`: `</think>` there
is a NoThinking response, anything else starts a thinking. With our template (and Qwen3's
hybrid one in thinking mode) the model writes `<think>` itself, so the decision is the second
completion token; with an R1-style template that ends the prompt with `<think>` it is the first.

- `adaptthink`: the importance-sampling rollout of AdaptThink (arXiv 2505.13417). Of the K
  copies of a prompt in a batch, round(K * nothinking_ratio) are forced to NoThinking (`</think>`
  forced as the decision token) and the rest to thinking (a fixed opener token forced there, as
  the reference forces its model's most frequent opener; steps/adaptthink.py picks ours from
  the reference pass). The forced `<think>` is the template's opener and carries no loss (mask
  0); the forced decision token is the policy's (mask 1), and the stage sets its old log-prob to
  log 0.5, the probability of the forcing. Which rollouts were forced reaches the rewards as the
  `forced_nothinking` column (`meta["reward_columns"]`, steps/core/rl.py).
- `adacot`: the model decides (plain decoding in thinking mode; `meta["thinks"]` says whether it
  thought, so the train log's `rollout/thinks` is the think ratio per step); with `mask_decision` the
  decision token gets mask 0, so it carries no loss: AdaCoT's Selective Loss Masking
  (arXiv 2505.11896). The token still counts as written by the policy nowhere else than in the
  loss (1 token off `policy_tokens`; no reward here reads lengths).
Evaluation decodes these models with `plain` (the model decides): these two are for training.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from steps.core.backends import SamplingParams
from steps.core.prompts import THINK_CLOSE, THINK_OPEN, Prompt, split_completion
from steps.core.rollouts import RolloutCompletion
from steps.core.rollouts.plain import PlainRollout


def marker_ids(tokenizer: Any) -> tuple[int, int]:
    """The ids of `<think>` and `</think>`; each must be one token."""
    ids = []
    for marker in (THINK_OPEN, THINK_CLOSE):
        enc = tokenizer(marker, add_special_tokens=False)["input_ids"]
        if len(enc) != 1:
            raise ValueError(f"the tokenizer splits {marker!r} into {len(enc)} tokens {enc}; hybrid thinking needs "
                             "it as one token (Qwen3's tokenizer and the embedded models' have it)")
        ids.append(enc[0])
    return ids[0], ids[1]


def opened_by_prompt(prompt_text: str) -> bool:
    """The template ends the prompt with `<think>` (R1-style): the completion starts at the decision."""
    return prompt_text.rstrip().endswith(THINK_OPEN)


def decision_index(completion_ids: Sequence[int], open_id: int, prompt_opened: bool = False) -> int | None:
    """Index of the decision token in the completion; None when there is none (no opener)."""
    if prompt_opened:
        return 0 if len(completion_ids) > 0 else None
    if len(completion_ids) >= 2 and completion_ids[0] == open_id:
        return 1
    return None


def forced_nothinking(prompts: Sequence[Prompt], ratio: float) -> list[bool]:
    """Per prompt occurrence: the first round(K * ratio) of the K copies of a prompt are forced
    to NoThinking. Copies are recognised by their text, wherever they sit in the batch."""
    counts = Counter(p.text for p in prompts)
    seen: Counter = Counter()
    out = []
    for p in prompts:
        out.append(seen[p.text] < round(counts[p.text] * ratio))
        seen[p.text] += 1
    return out


class AdaptThinkRollout:
    def __init__(self, backend: Any, thinking_opener_id: int, nothinking_ratio: float = 0.5,
                 chat_template_kwargs: dict[str, Any] | None = None):
        if not 0.0 <= nothinking_ratio <= 1.0:
            raise ValueError(f"nothinking_ratio must be in [0, 1], got {nothinking_ratio}")
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.open_id, self.close_id = marker_ids(self.tokenizer)
        if thinking_opener_id in (self.open_id, self.close_id):
            raise ValueError("the thinking opener must be a token other than <think> and </think>")
        self.opener_id = int(thinking_opener_id)
        self.ratio = nothinking_ratio
        self.chat_template_kwargs = dict(chat_template_kwargs or {})

    def prefix(self, prompt: Prompt, nothinking: bool) -> tuple[list[int], list[int]]:
        """The forced ids that start the completion, and their ownership mask."""
        decision = self.close_id if nothinking else self.opener_id
        if opened_by_prompt(prompt.text):
            return [decision], [1]
        return [self.open_id, decision], [0, 1]

    def _forced_prompt(self, prompt: Prompt, ids: list[int]) -> Prompt:
        text = prompt.text + self.tokenizer.decode(ids)
        enc = self.tokenizer
        base = enc(prompt.text, add_special_tokens=False)["input_ids"]
        full = enc(text, add_special_tokens=False)["input_ids"]
        if full[:len(base)] != base or full[len(base):] != ids:
            raise ValueError(f"prompt {prompt.key}: the forced start {enc.decode(ids)!r} does not tokenise back to "
                             f"{ids} after the prompt; choose another adaptthink.thinking_opener")
        return replace(prompt, text=text)

    def run(self, prompts: Sequence[Prompt], sampling: SamplingParams, on_batch=None):
        flags = forced_nothinking(prompts, self.ratio)
        prefixes = [self.prefix(p, f) for p, f in zip(prompts, flags, strict=True)]
        forced = [self._forced_prompt(p, ids) for p, (ids, _) in zip(prompts, prefixes, strict=True)]
        budget = max(1, sampling.max_new_tokens - max(len(ids) for ids, _ in prefixes))
        outs = self.backend.generate(forced, replace(sampling, max_new_tokens=budget))
        results = []
        for (ids, mask), flag, cs in zip(prefixes, flags, outs, strict=True):
            comps = []
            for c in cs:
                all_ids = tuple(ids) + tuple(c.token_ids)
                comps.append(RolloutCompletion(
                    text=self.tokenizer.decode(list(all_ids), skip_special_tokens=True).strip(), token_ids=all_ids,
                    mask=tuple(mask) + (1,) * len(c.token_ids), prompt_tokens=c.prompt_tokens - len(ids),
                    finish_reason=c.finish_reason, latency_s=c.latency_s,
                    meta={"forced_nothinking": flag, "decision_index": len(ids) - 1,
                          "reward_columns": {"forced_nothinking": flag}}))
            results.append(comps)
        if on_batch:
            on_batch(list(range(len(prompts))), results)
        return results

    def close(self) -> None:
        self.backend.close()


class AdaCoTRollout(PlainRollout):
    """The model decides; with `mask_decision` its decision token carries no loss."""

    def __init__(self, backend: Any, mask_decision: bool = False, chat_template_kwargs: dict[str, Any] | None = None):
        super().__init__(backend, chat_template_kwargs)
        self.mask_decision = mask_decision
        self.open_id = marker_ids(backend.tokenizer)[0] if mask_decision else None

    def run(self, prompts: Sequence[Prompt], sampling: SamplingParams, on_batch=None):
        outs = super().run(prompts, sampling)
        # the policy's own decision, unforced: its mean per step is the think ratio in training
        outs = [[replace(c, meta={**c.meta, "thinks": bool(split_completion(c.text)[0])}) for c in cs] for cs in outs]
        if self.mask_decision:
            outs = [[self.masked(c, opened_by_prompt(p.text)) for c in cs] for p, cs in zip(prompts, outs, strict=True)]
        if on_batch:
            on_batch(list(range(len(prompts))), outs)
        return outs

    def masked(self, c: RolloutCompletion, prompt_opened: bool) -> RolloutCompletion:
        i = decision_index(c.token_ids, self.open_id, prompt_opened)
        if i is None:
            return c
        mask = list(c.mask)
        mask[i] = 0
        return replace(c, mask=tuple(mask), meta={**c.meta, "decision_index": i, "decision_masked": True})


PROTOCOLS = {
    "adaptthink": lambda backend, **o: AdaptThinkRollout(backend, **o),
    "adacot": lambda backend, **o: AdaCoTRollout(backend, **o),
}
