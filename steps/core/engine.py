"""The fast rollout engine: batched decoding with a KV cache that drops finished rows.

    engine = FastEngine(model, eos_ids=[2], pad_id=0)
    outs = engine.generate([[5, 6, 7], [8, 9]], seeds=[11, 12], temperature=1.0, top_p=1.0, max_new_tokens=64)
    outs[i].token_ids, outs[i].finish_reason          # end-of-sequence excluded, "stop" | "length"

`model.generate` keeps every row of a batch in every forward pass until the longest one ends:
a row that has emitted end-of-sequence goes on being decoded (and padded) while the tail runs,
and in reinforcement learning the length distribution has a long tail. Here a row that ends
leaves the batch at once: its slice of the KV cache (transformers' `DynamicCache`), of the
attention mask and of the positions is dropped, and so are the leading cache columns that were
left padding of prompts no longer in the batch, so the tail runs at its own batch size and its
own length. Nothing else is changed: the same model forward, the same positions (the count of
real tokens before each one, as `model.generate` derives them from the mask), and the same
draws: a sampled token comes from `RowSampler` (steps.core.backends), the uniform number for a
row at generated position t being a hash of (the row's seed, t), so a completion does not
depend on its batch, on which rows left before it, or on which engine decoded it. Greedy
outputs are token-identical to `model.generate`'s and sampled ones identical up to float noise
in the logits (a batch of another size may sum in another order); tests/test_engine.py checks
both.

The back ends select it with `engine: fast` (steps.core.backends.TransformersBackend) and the
RL stages with `engine: fast` in their params section (steps.core.rl.RLConfig).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]  # end-of-sequence excluded
    finish_reason: Literal["stop", "length"]


class FastEngine:
    """Decodes a batch of token-id prompts on `model` (a transformers causal LM, left as it is)."""

    def __init__(self, model: Any, eos_ids: Sequence[int], pad_id: int):
        self.model = model
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        self.stats = {"forward_passes": 0, "row_steps": 0}  # row_steps: rows decoded, summed over passes

    @property
    def device(self) -> Any:
        return next(self.model.parameters()).device

    def generate(self, prompts: Sequence[Sequence[int]], seeds: Sequence[int], temperature: float,
                 top_p: float = 1.0, max_new_tokens: int = 128) -> list[Generated]:
        import torch

        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: one seed per prompt row")
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("an empty prompt: every row needs at least one token")
        with torch.inference_mode():
            return self._generate(prompts, seeds, temperature, top_p, max_new_tokens)

    def _generate(self, prompts, seeds, temperature, top_p, max_new_tokens):
        import torch
        from transformers import DynamicCache

        from steps.core.backends import RowSampler

        dev, n = self.device, len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        # Positions as model.generate derives them: real tokens counted from 0, padding at 1.
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # (B, T)
        sampler = RowSampler(seeds, temperature, top_p, 0, dev) if temperature > 0 else None
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, pos, cache)  # (B, V)
        nxt = pos[:, -1] + 1  # (B,) the next token's position
        alive = list(range(n))  # original row of each batch row
        gen: list[list[int]] = [[] for _ in range(n)]
        finish: list[str] = ["length"] * n
        for step in range(max_new_tokens):
            tok = sampler.draw(logits, step) if sampler else logits.argmax(-1)  # (b,)
            keep = []
            for b, t in enumerate(tok.tolist()):
                r = alive[b]
                if t in self.eos_ids:
                    finish[r] = "stop"
                    continue
                gen[r].append(t)
                if len(gen[r]) < max_new_tokens:
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(alive):
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                mask, nxt, tok = mask[sel], nxt[sel], tok[sel]
                alive = [alive[b] for b in keep]
                if sampler:
                    sampler.select(sel)
                mask = self._drop_leading_padding(cache, mask)
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
            logits = self._forward(tok.unsqueeze(1), mask, nxt.unsqueeze(1), cache)
            nxt = nxt + 1
        return [Generated(tuple(g), f) for g, f in zip(gen, finish)]  # type: ignore[arg-type]

    def _forward(self, ids: Any, mask: Any, pos: Any, cache: Any) -> Any:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        self.stats["forward_passes"] += 1
        self.stats["row_steps"] += ids.shape[0]
        return out.logits[:, -1, :].float()  # (b, V), as model.generate hands scores to its processors

    @staticmethod
    def _drop_leading_padding(cache: Any, mask: Any) -> Any:
        """Cut the cache columns that are padding in every remaining row (a longer prompt's
        room, its row gone): attention over them is masked anyway, so this only saves work."""
        first = int(mask.any(0).int().argmax())
        if first == 0 or any(getattr(layer, "is_sliding", False) for layer in cache.layers):
            return mask  # a sliding window's cache is not aligned with the mask's columns
        for layer in cache.layers:
            if getattr(layer, "is_initialized", False):
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        return mask[:, first:]
