"""Segmented decoding for rollouts that pause the policy (relay calls, routed searches).

A segment is what the policy writes between two pauses: it stops at a stop tag (a single token
when the tokenizer has one, else the decoded tail's text), at the end-of-sequence, or at a row's
own token limit. Rows are decoded together in one batched `generate`; each row keeps its own
random stream (`RowSampler`), so segment 0 draws exactly what the plain back end would draw for
the same prompt and seed, and a row's tokens never depend on the rows beside it.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Segment:
    ids: list[int]   # the tokens written, the stop tag included, end-of-sequence excluded
    ended: bool      # the policy wrote end-of-sequence
    closed: bool     # the segment ends with a stop tag


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer spells it as one known token, else None."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 and ids[0] != tokenizer.unk_token_id else None


def generate_segments(backend: Any, contexts: Sequence[list[int]], seeds: Sequence[int], limits: Sequence[int],
                      temperature: float, top_p: float, stop_ids: set[int] = frozenset(),
                      stop_texts: tuple[str, ...] = ()) -> list[Segment]:
    """One segment per context (prompt + tokens so far), at most `limits[i]` tokens each.

    `stop_ids` stop on the last token; `stop_texts` on the decoded last 8 tokens (a tokenizer that
    spells a tag in several tokens). Both empty: a segment runs to end-of-sequence or its limit."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    from steps.core.backends import RowSampler

    tok, device = backend.tokenizer, backend.device
    start = max(len(c) for c in contexts)
    batch = tok.pad({"input_ids": [list(c) for c in contexts]}, return_tensors="pt").to(device)
    sampler = RowSampler(list(seeds), temperature, top_p, start, device) if temperature > 0 else None

    def closes(ids: Sequence[int]) -> bool:
        if ids and ids[-1] in stop_ids:
            return True
        return bool(stop_texts) and tok.decode(ids[-8:], skip_special_tokens=True).rstrip().endswith(stop_texts)

    class Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **_):
            n = input_ids.shape[1] - start
            if not stop_ids and not stop_texts:
                return torch.tensor([n >= lim for lim in limits], device=input_ids.device)
            rows = input_ids[:, -8:].tolist()
            return torch.tensor([n >= lim or closes(r) for r, lim in zip(rows, limits)], device=input_ids.device)

    eos_ids = set(backend._eos_ids())
    with torch.inference_mode():
        out = backend.model.generate(**batch, do_sample=False, max_new_tokens=max(1, max(limits)),
                                     temperature=None, top_p=None, top_k=None,
                                     logits_processor=[sampler] if sampler else None,
                                     stopping_criteria=StoppingCriteriaList([Stop()]),
                                     pad_token_id=tok.pad_token_id, eos_token_id=list(eos_ids))
    segments = []
    for ids, limit in zip(out[:, batch["input_ids"].shape[1]:].tolist(), limits, strict=True):
        kept, ended, closed = [], False, False
        for t in ids[:limit]:
            if t in eos_ids:
                ended = True
                break
            kept.append(t)
            if (stop_ids or stop_texts) and closes(kept):
                closed = True
                break
        segments.append(Segment(kept, ended, closed))
    return segments
