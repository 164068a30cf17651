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
own length. Each layer's keys and values are written in place into a buffer with room for the
rollout (transformers' `DynamicLayer` concatenates, copying the whole cache every step: 1.37 x
slower a rollout with 670-token prompts, bench/kv_cache.py). A prompt repeated in the batch (an
RL group's K completions, n samples) is prefilled once and its cache rows copied. Nothing else is
changed: the same model forward, the same positions (the count of real tokens before each one,
as `model.generate` derives them from the mask), and the same draws: a sampled token comes
from `RowSampler` (steps.core.backends), the uniform number for a row at generated position t
being a hash of (the row's seed, t), so a completion does not depend on its batch, on which rows
left before it, or on which engine decoded it. Greedy outputs are token-identical to
`model.generate`'s and sampled ones identical up to float noise in the logits (a batch of
another size may sum in another order);
tests/test_engine.py checks both.

Speculative decoding (`speculative: {drafter, draft_tokens, max_batch, depth, ...}`; off when
empty): while at most `max_batch` rows run (the tail), a drafter proposes tokens and the policy
verifies them in one pass, exactly (`_Run._verify`). Greedy output stays token-identical to the
policy's own; sampled output is distributed as the policy's (the draws differ from the plain
engine's: an accept test uses a second stream). Drafters: `prompt_lookup` (the row's own
n-grams) or `eagle`, TLT's drafter trained on the policy's features, which the engine records
while it decodes (steps.core.drafter); the depth is fixed or picked per pass by a bandit
(`depth: bandit`, TLT's bucketed epsilon-greedy).

Compiled (`compile: true`): every pass runs through `torch.compile(dynamic=True)` of the policy's
decoder and output layer (`compiled_pass`), one graph for every batch size above one and cache
length after a first call that compiles (about a minute and a half a process on two CPU cores,
less with inductor's on-disk cache warm; a single row runs eagerly, as a size of 1 would be a
graph of its own); on these small models a pass is mostly framework work, which the
compiled graph removes (bench/compile_pass.py). The features the eagle drafter reads come out of
that graph with the logits, as a forward hook inside a compiled graph does not fire; the drafter's
own drafts are compiled too (`Drafter.propose`). A mixture-of-experts policy decodes its experts
there with transformers' `batched_mm` rather than its default `grouped_mm`, which under compile with
float32 weights loops over the experts outside the graph (`compiled_experts`: 1.7-2.4 ms a pass
over 32 rows against 3.0-4.5 for the embedded default's student). Outputs are the eager engine's up to float
noise (a fused kernel sums in another order).

The back ends select it with `engine: fast` (steps.core.backends.TransformersBackend) and the
RL stages with `engine: fast` in their params section (steps.core.rl.RLConfig); `compile: true`
beside it in either.
"""
from __future__ import annotations

import contextlib
import functools
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal


@dataclass(frozen=True)
class Generated:
    token_ids: tuple[int, ...]  # end-of-sequence excluded
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True)
class SpecConfig:
    """Speculative decoding in the tail of a batch (`speculative:` in the back end's options or an
    RL stage's params; empty: off)."""
    # prompt_lookup: the row's own n-grams, no model. eagle: a block trained on the policy's
    # features (steps.core.drafter), online between RL steps when `online`.
    drafter: Literal["prompt_lookup", "eagle"] = "prompt_lookup"
    draft_tokens: int = 4  # tokens proposed per verification pass (the bandit's largest depth)
    max_batch: int = 32  # speculate only while at most this many rows are running
    ngram: int = 3  # prompt_lookup: the longest suffix looked up in the row's own context
    # A verification pass costs more than a plain step: when the drafts kept per row and pass
    # (a running mean) fall below this, speculation pauses for `backoff_steps` plain steps
    # (depth: fixed only; the bandit has a plain step among its arms).
    min_accept: float = 0.3
    backoff_steps: int = 16
    depth: Literal["fixed", "bandit"] = "fixed"  # bandit: epsilon-greedy per batch-size bucket
    epsilon: float = 0.1
    # eagle: optimiser steps on the recorded features before the first rollout's drafts are
    # used (init_steps) and after each rollout when online (train_steps); frozen: init only.
    online: bool = True
    # eagle, TLT's initialisation from the RFT data: judge-kept candidates (data/judge/kept.jsonl)
    # and the examples they answer (data/ingest/train.jsonl), up to init_rows of them, on which
    # the drafter trains init_steps before the first rollout (empty: from the first rollout's
    # features). A DVC stage that sets them lists both files as deps.
    init_data: str = ""
    init_examples: str = ""
    init_rows: int = 512
    init_steps: int = 200
    train_steps: int = 10
    drafter_batch: int = 512
    drafter_lr: float = 3e-3

    def __post_init__(self) -> None:
        for key in ("min_accept", "epsilon", "drafter_lr"):
            if not isinstance(getattr(self, key), (int, float)) or getattr(self, key) < 0:
                raise ValueError(f"speculative.{key}: expected a number >= 0, got {getattr(self, key)!r}")
        if self.drafter not in ("prompt_lookup", "eagle"):
            raise ValueError(f"speculative.drafter: unknown drafter {self.drafter!r}; known: ['prompt_lookup', 'eagle']")
        if self.depth not in ("fixed", "bandit"):
            raise ValueError(f"speculative.depth: expected 'fixed' or 'bandit', got {self.depth!r}")
        if not isinstance(self.online, bool):
            raise ValueError(f"speculative.online: expected true or false, got {self.online!r}")
        for key in ("draft_tokens", "max_batch", "ngram", "backoff_steps", "drafter_batch"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"speculative.{key}: expected an integer >= 1, got {getattr(self, key)!r}")
        if bool(self.init_data) != bool(self.init_examples):
            raise ValueError("speculative.init_data and init_examples go together (the kept candidates and "
                             "the examples they answer)")
        if self.init_data and self.drafter != "eagle":
            raise ValueError("speculative.init_data: only the eagle drafter is trained")
        for key in ("init_steps", "train_steps", "init_rows"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ValueError(f"speculative.{key}: expected an integer >= 0, got {getattr(self, key)!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, where: str = "speculative") -> SpecConfig | None:
        """The config from a params mapping (empty or None: speculation off); errors name `where`."""
        if not options:
            return None
        unknown = set(options) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        try:
            return cls(**options)
        except ValueError as e:
            raise ValueError(f"{where}.{str(e).removeprefix('speculative.')}") from None


class PromptLookup:
    """A drafter with no model: the tokens that followed the latest earlier occurrence of the
    row's last n tokens (n = ngram .. 1) in its own prompt and completion. Completions here copy
    document sentences from the prompt and repeat their own phrases, so this proposes well at no
    cost; an index of every n-gram's latest successor keeps a lookup O(1)."""

    def __init__(self, ngram: int):
        self.ngram = ngram
        self.ctx: dict[int, list[int]] = {}
        self.index: dict[int, dict[tuple[int, ...], int]] = {}

    def add(self, row: int, tokens: Sequence[int]) -> None:
        ctx, index = self.ctx.setdefault(row, []), self.index.setdefault(row, {})
        for t in tokens:
            ctx.append(t)
            end = len(ctx) - 1  # ctx[end] now follows each n-gram that ends just before it
            for n in range(1, self.ngram + 1):
                if end - n >= 0:
                    index[tuple(ctx[end - n:end])] = end

    def propose(self, row: int, k: int) -> list[int]:
        ctx, index = self.ctx[row], self.index[row]
        for n in range(min(self.ngram, len(ctx)), 0, -1):
            at = index.get(tuple(ctx[-n:]))
            if at is not None:
                return ctx[at:at + k]
        return []

    def drop(self, row: int) -> None:
        self.ctx.pop(row, None)
        self.index.pop(row, None)


# One compiled pass per model, shared by the engines built on it (a back end builds one per
# call): compiling again for each would cost the minute that compiling takes, every rollout.
_COMPILED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def compiled_pass(model: Any) -> Any:
    """`fn(ids, mask, pos, cache, keep) -> (features, logits)` of `model`'s last `keep`
    positions, compiled once per model: the decoder's last hidden state (the input of the output
    layer, what the eagle drafter reads) and the output layer over it. That is the causal LM's
    own forward for the models it is checked on here (Qwen3, Qwen3-MoE, Llama); a model whose
    logits are more than the output layer of that state (a soft cap, a scale) is refused."""
    if model in _COMPILED:
        return _COMPILED[model]
    import torch

    decoder, head = model.get_decoder(), model.get_output_embeddings()

    def decode_pass(ids: Any, mask: Any, pos: Any, cache: Any, keep: int) -> tuple[Any, Any]:
        h = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                    use_cache=True).last_hidden_state[:, -keep:]
        return h, head(h)

    # Eager, once: the pass must give the model's own logits, or the compiled engine would decode
    # another model without a word.
    probe = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)
    with torch.inference_mode():
        want = model(input_ids=probe, use_cache=False).logits[:, -1:].float()
        _, got = decode_pass(probe, torch.ones_like(probe), torch.arange(3, device=probe.device)[None], None, 1)
    if not torch.allclose(want, got.float(), rtol=1e-4, atol=1e-4):
        raise ValueError(f"compile: {type(model).__name__}'s logits are not its output layer over its decoder's "
                         "last state (a soft cap or a scale?): the compiled pass would decode another model; "
                         "run this model with compile: false")
    compiled = torch.compile(decode_pass, dynamic=True)
    experts = compiled_experts(model)

    def run_pass(ids: Any, mask: Any, pos: Any, cache: Any, keep: int) -> tuple[Any, Any]:
        # One row runs eagerly: torch.compile specialises a dimension of size 1, so the tail's
        # last row would compile a graph of its own (43 s on two cores, bench/compile_pass.py)
        # to save about a millisecond a pass; the dynamic graph serves every larger batch.
        if ids.shape[0] == 1:
            return decode_pass(ids, mask, pos, cache, keep)
        with _experts_implementation(model, experts):
            return compiled(ids, mask, pos, cache, keep)

    _COMPILED[model] = run_pass
    return run_pass


# The most bytes of expert weights `batched_mm` may gather for one token (its top-k experts'
# projections): 48 KiB for the embedded default's student; a 30B-A3B model in float32 gathers
# about 150 MiB a token, where the per-expert loop is the lesser cost.
GATHER_BYTES_PER_TOKEN = 1 << 20


def compiled_experts(model: Any) -> str | None:
    """The experts kernel a compiled pass of `model` decodes with: "batched_mm" where transformers'
    default would leave the compiled graph, None (the model's own) elsewhere.

    transformers runs a mixture-of-experts layer with `grouped_mm` by default; under torch.compile
    with weights other than bfloat16 that falls back to an opaque op which loops over the experts
    in Python (`transformers.integrations.moe._grouped_mm_fallback`: two small matmuls per expert
    and layer, 128 a pass for the embedded default's student). `batched_mm`, also transformers',
    gathers each token's experts' weights and runs two batched matmuls that stay in the graph:
    a compiled pass over 32 rows took 1.7-2.4 ms against 3.0-4.5 ms on two CPU cores
    (`bench.compile_pass --experts grouped_mm,batched_mm`). The gather grows
    with the experts' size, so a model whose top-k experts hold more than GATHER_BYTES_PER_TOKEN
    keeps its own kernel. Only the compiled pass switches (`_experts_implementation`): the model is
    shared with the trainer, whose forward keeps its kernel."""
    import torch

    config, weight = model.config, next(model.parameters())
    if getattr(config, "_experts_implementation", None) != "grouped_mm":
        return None  # a dense model, or an implementation the user chose
    if weight.dtype == torch.bfloat16:
        return None  # grouped_mm compiles to a real kernel in bfloat16
    sizes = [getattr(config, k, None) for k in ("hidden_size", "moe_intermediate_size", "num_experts_per_tok")]
    if None in sizes:
        return None
    hidden, inter, top_k = sizes
    per_token = 3 * hidden * inter * top_k * weight.element_size()
    return "batched_mm" if per_token <= GATHER_BYTES_PER_TOKEN else None


@contextlib.contextmanager
def _experts_implementation(model: Any, name: str | None) -> Any:
    """`model` runs its experts with `name` inside the block, its own kernel again after it."""
    if name is None:
        yield
        return
    # The config's own setter, not `set_experts_implementation`: that one validates the name and
    # walks every submodule, about 0.1 ms, which a 2 ms pass would feel; the experts modules read
    # this config at each call (`use_experts_implementation`).
    config = model.config
    before = config._experts_implementation
    config._experts_implementation = name
    try:
        yield
    finally:
        config._experts_implementation = before


@functools.cache
def _growing_layer_class() -> type:
    """transformers' `DynamicLayer` whose keys and values live in a buffer with room for the tokens
    still to come (`reserve`): a decode step writes its column in place. The `DynamicLayer` itself
    concatenates on every step, a new tensor and a copy of the whole cache per layer, keys and
    values, which grows with the cache: bench/kv_cache.py measures 1.37 x a rollout with 670-token
    prompts and nothing at 60.
    `keys` / `values` stay what `DynamicLayer` readers expect, (b, h, n, d) tensors (views of the
    buffer's first n columns), so masks, lengths and attention are unchanged. Built once, on first
    use: transformers is imported lazily, as everywhere in this module."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        def __init__(self, reserve: int):
            super().__init__()
            self.reserve = reserve
            self._kbuf = self._vbuf = None
            self._n = 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, add = self._n, key_states.shape[-2]
            if self._kbuf is None or n + add > self._kbuf.shape[-2]:
                # room for the rest of the rollout: allocated once a call (again only when verification
                # blocks whose columns stay live in some row outgrow it)
                cap = n + add + self.reserve
                k = key_states.new_empty((*key_states.shape[:2], cap, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:2], cap, value_states.shape[-1]))
                if n:
                    k[:, :, :n], v[:, :, :n] = self.keys, self.values
                self._kbuf, self._vbuf = k, v
            self._kbuf[:, :, n:n + add] = key_states
            self._vbuf[:, :, n:n + add] = value_states
            self._set(n + add)
            return self.keys, self.values

        def _set(self, n: int) -> None:
            self._n = n
            self.keys, self.values = self._kbuf[:, :, :n], self._vbuf[:, :, :n]

        def batch_select_indices(self, indices: Any) -> None:
            if self._kbuf is None:
                return
            m, n = int(indices.numel()), self._n
            if m <= self._kbuf.shape[0]:
                # Fewer rows (a row left): the kept rows' filled columns move up in place (the
                # gather copies first), not the whole buffer with its empty room.
                self._kbuf[:m, :, :n] = self._kbuf[indices, :, :n]
                self._vbuf[:m, :, :n] = self._vbuf[indices, :, :n]
                self._kbuf, self._vbuf = self._kbuf[:m], self._vbuf[:m]
            else:  # more rows (a prompt's cache copied to its repeats): a new buffer
                self._kbuf, self._vbuf = self._kbuf[indices], self._vbuf[indices]
            self._set(n)

        def keep_columns(self, idx: Any) -> None:
            """Keep the cached columns `idx` (ascending): a cut tail costs nothing, a cut in the
            middle moves the columns after it."""
            if self._kbuf is None:
                return
            m = int(idx.numel())
            if m and int(idx[-1]) == m - 1:  # idx == 0..m-1: the dead columns are a suffix
                self._set(m)
                return
            self._kbuf[:, :, :m] = self._kbuf[:, :, idx]  # indexing copies first: no overlap hazard
            self._vbuf[:, :, :m] = self._vbuf[:, :, idx]
            self._set(m)

    return GrowingLayer


class FastEngine:
    """Decodes a batch of token-id prompts on `model` (a transformers causal LM, left as it is)."""

    def __init__(self, model: Any, eos_ids: Sequence[int], pad_id: int, speculative: SpecConfig | None = None,
                 state: Any = None, compile: bool = False):
        from steps.core.drafter import SpecState

        self.model = model
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        self.spec = speculative
        # The drafter and the bandit: the caller's when it keeps them across calls (an RL stage),
        # else this engine's own.
        self.state = state if state is not None or speculative is None else SpecState(
            speculative, model.get_output_embeddings().in_features)
        self._feats: list[Any] = []  # eagle: the output layer's input, one entry per pass
        self._records = False  # whether this call's passes keep them (an eagle drafter is on)
        self._pass = compiled_pass(model) if compile else None
        # row_steps: rows decoded, summed over passes; drafted / accepted: draft tokens proposed
        # and kept over verification passes (mean accepted per pass = accepted / verify_row_passes)
        self.stats = {"forward_passes": 0, "row_steps": 0, "verify_passes": 0, "verify_row_passes": 0,
                      "drafted": 0, "accepted": 0, "draft_seconds": 0.0}

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
        from steps.core.drafter import output_features

        # eagle: the features of each pass, (b, keep, d), read (and dropped) by _Run._record
        self._records = self.state is not None and self.state.drafter is not None
        hook = self._records and self._pass is None  # compiled: forward() keeps them
        with output_features(self.model) if hook else contextlib.nullcontext([]) as self._feats, \
                torch.inference_mode():
            return _Run(self, prompts, seeds, temperature, top_p, max_new_tokens).decode()

    def forward(self, ids: Any, mask: Any, pos: Any, cache: Any, keep: int = 1) -> Any:
        if self._pass is not None:
            feats, logits = self._pass(ids, mask, pos, cache, keep)
            if self._records:
                self._feats.append(feats)
        else:
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True, logits_to_keep=keep).logits
        self.stats["forward_passes"] += 1
        self.stats["row_steps"] += ids.shape[0]
        return logits[:, -keep:, :].float()  # (b, keep, V), as model.generate hands scores to its processors


class _Run:
    """One `generate` call's state: the running rows (`alive`, original indices), their cache,
    mask and next positions, each row's output, and the token each row drew last (emitted, not
    yet fed to the model)."""

    def __init__(self, engine: FastEngine, prompts, seeds, temperature, top_p, max_new_tokens):
        import torch

        from steps.core.backends import RowSampler

        self.e, self.max_new = engine, max_new_tokens
        self.dev = dev = engine.device
        n = len(prompts)
        width = max(len(p) for p in prompts)
        ids = torch.full((n, width), engine.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[r, width - len(p):] = 1
        self.ids, self.mask = ids.to(dev), mask.to(dev)
        # Each distinct prompt's first row, and every row's distinct prompt (prefilled once).
        distinct: dict[tuple[int, ...], int] = {}
        self.inverse, self.first = [], []
        for r, p in enumerate(prompts):
            self.inverse.append(distinct.setdefault(tuple(p), len(distinct)))
            if self.inverse[-1] == len(self.first):
                self.first.append(r)
        self.sampler = RowSampler(seeds, temperature, top_p, 0, dev) if temperature > 0 else None
        self.alive = list(range(n))
        self.gen: list[list[int]] = [[] for _ in range(n)]
        self.finish: list[str] = ["length"] * n
        spec, state = engine.spec, engine.state
        self.lookup = PromptLookup(spec.ngram) if spec and spec.drafter == "prompt_lookup" else None
        self.eagle = state.drafter if state is not None else None
        self.bandit = state.bandit if state is not None else None
        self.accept_mean = None  # running mean of drafts kept per row and verification pass
        self.pause = 0  # plain steps left before speculation is tried again
        if self.lookup:
            for r, p in enumerate(prompts):
                self.lookup.add(r, p)
        # eagle: per row, every fed token and its feature (the drafter's training data), and the
        # feature of the position that produced the row's pending token (where drafting starts).
        self.rec: dict[int, tuple[list[int], list[Any]]] = {r: ([], []) for r in range(n)} if self.eagle else {}
        self.feat: Any = None

    def decode(self) -> list[Generated]:
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        e = self.e
        # Positions as model.generate derives them: real tokens counted from 0, padding at 1.
        pos = (self.mask.cumsum(-1) - 1).masked_fill(self.mask == 0, 1)  # (B, T)
        self.cache = DynamicCache(config=e.model.config)
        if e._pass is None and all(type(layer) is DynamicLayer for layer in self.cache.layers):
            # Eager: each layer's keys and values in a buffer with room for the whole rollout (a
            # column written in place a step, not the whole cache copied). Compiled, the cache
            # stays transformers' own: a buffer mutated inside the graph would be copied whole.
            grow = _growing_layer_class()
            room = self.max_new + 1 + (e.spec.draft_tokens if e.spec else 0)
            self.cache.layers = [grow(room) for _ in self.cache.layers]
        if len(self.first) < len(self.alive):
            # A prompt repeated in the batch (an RL group's K completions, n samples of one
            # prompt) is prefilled once; its cache rows, logits and features are copied to the
            # repeats. Copying a row costs far less than computing it.
            first = torch.tensor(self.first, device=self.dev)
            logits = e.forward(self.ids[first], self.mask[first], pos[first], self.cache)[:, -1]
            inverse = torch.tensor(self.inverse, device=self.dev)
            self.cache.batch_select_indices(inverse)
            logits = logits[inverse]  # (B, V)
            if e._records:
                e._feats[-1] = e._feats[-1][inverse]
        else:
            logits = e.forward(self.ids, self.mask, pos, self.cache)[:, -1]  # (B, V)
        self.nxt = pos[:, -1] + 1  # (B,) the next fed token's position
        self._record(self.ids[:, -1:], [0] * len(self.alive))
        self.tok = self._draw(logits)
        self._advance([[t] for t in self.tok.tolist()])
        while self.alive:
            b = len(self.alive)
            spec = (e.spec is not None and b <= e.spec.max_batch and self.pause == 0
                    and (self.eagle is None or self.eagle.trained_steps > 0))  # an untrained drafter only records
            self.pause = max(0, self.pause - 1)
            depth = (self.bandit.choose(b) if self.bandit else e.spec.draft_tokens) if spec else 0
            t0 = time.perf_counter()
            drafts = self._drafts(depth) if depth else None
            if drafts and any(drafts):
                emitted = self._verify(drafts)
            else:
                self.mask = torch.cat([self.mask, self.mask.new_ones((b, 1))], dim=1)
                logits = e.forward(self.tok.unsqueeze(1), self.mask, self.nxt.unsqueeze(1), self.cache)[:, -1]
                self._record(self.tok.unsqueeze(1), [0] * b)
                self.nxt = self.nxt + 1
                self.tok = self._draw(logits)
                emitted = [[t] for t in self.tok.tolist()]
            if self.bandit is not None and spec:
                self.bandit.update(b, depth, sum(len(o) for o in emitted), time.perf_counter() - t0)
            self._advance(emitted)
        if self.eagle is not None:
            self.eagle.record([(toks, torch.cat(feats)) for toks, feats in self.rec.values() if feats])
        return [Generated(tuple(g), f) for g, f in zip(self.gen, self.finish)]  # type: ignore[arg-type]

    def _record(self, fed: Any, last: list[int]) -> None:
        """eagle: keep each running row's fed tokens `fed` (b, k+1) up to and including column
        last[i], with their features, and start the next drafts from column last[i]'s feature."""
        if self.eagle is None:
            return
        import torch

        feats = self.e._feats.pop()  # (b, k+1, d): this pass's
        fed_rows = fed.tolist()
        for i, r in enumerate(self.alive):
            toks, fs = self.rec[r]
            toks.extend(fed_rows[i][:last[i] + 1])
            fs.append(feats[i, :last[i] + 1])  # (n, d) chunks, one per pass
        self.feat = feats[torch.arange(len(self.alive), device=feats.device), torch.tensor(last, device=feats.device)]

    def _steps(self) -> Any:
        """(b,) each running row's generated position (the index of its next token)."""
        import torch

        return torch.tensor([len(self.gen[r]) for r in self.alive], device=self.dev)

    def _draw(self, logits: Any) -> Any:
        return self.sampler.draw(logits, self._steps()) if self.sampler else logits.argmax(-1)  # (b,)

    def _drafts(self, depth: int) -> list[list[int]]:
        # A row needs room for the drafts and the one token its verification adds.
        room = [max(0, min(depth, self.max_new - len(self.gen[r]) - 1)) for r in self.alive]
        if self.eagle is None:
            return [self.lookup.propose(r, k) for r, k in zip(self.alive, room)]
        t0 = time.perf_counter()
        proposed = (self.eagle.propose(self.e.model, self.feat, self.tok, max(room), compiled=self.e._pass is not None)
                    .tolist() if max(room) else [])
        self.e.stats["draft_seconds"] += time.perf_counter() - t0
        return [p[:k] for p, k in zip(proposed, room)] if proposed else [[] for _ in room]

    def _verify(self, drafts: list[list[int]]) -> list[list[int]]:
        """One pass over each row's last token and its drafts; each row keeps the drafts the
        policy agrees with and one token of the policy's own (the correction, or a bonus when all
        were kept). Greedy: a draft is kept while it is the argmax. Sampling (speculative sampling
        with a one-token proposal q = delta(d)): d is kept with probability p(d), and on its
        rejection the token is drawn from p with d removed, renormalised: the residual
        (p - q)+ — so each token is distributed as p exactly."""
        import torch

        e, b = self.e, len(self.alive)
        k = max(len(d) for d in drafts)
        drafted = torch.tensor([d + [e.pad_id] * (k - len(d)) for d in drafts], dtype=torch.long, device=self.dev)
        block = torch.cat([self.tok.unsqueeze(1), drafted], 1)  # (b, k+1): the pending token, then the drafts
        pos = self.nxt.unsqueeze(1) + torch.arange(k + 1, device=self.dev)  # (b, k+1)
        self.mask = torch.cat([self.mask, self.mask.new_ones((b, k + 1))], dim=1)
        logits = e.forward(block, self.mask, pos, self.cache, keep=k + 1)  # (b, k+1, V)
        steps = self._steps()  # the position of each row's first draft
        # Row by row in one go: ok[i, j], draft j of row i is kept (and every one before it);
        # at the first refusal (or past the last draft) the row takes one token of the policy's.
        lens = torch.tensor([len(d) for d in drafts], device=self.dev)
        cols = torch.arange(k, device=self.dev)
        rows = torch.arange(b, device=self.dev)
        if self.sampler:
            probs = self.sampler.probs(logits.reshape(b * (k + 1), -1)).view(b, k + 1, -1)
            p_draft = probs[:, :k].gather(2, drafted.unsqueeze(2)).squeeze(2)  # (b, k)
            ok = self.sampler.uniforms(steps.unsqueeze(1) + cols, stream=1) < p_draft
        else:
            best = logits.argmax(-1)  # (b, k+1)
            ok = best[:, :k] == drafted
        a = (ok & (cols < lens.unsqueeze(1))).long().cumprod(1).sum(1)  # (b,) drafts kept
        if self.sampler:
            # Sampling, a draft d refused: the token comes from p with d removed, renormalised (the
            # residual (p - q)+ of a one-token proposal q = delta(d)); every draft kept: from p.
            last = probs[rows, a]  # (b, V)
            refused = a < lens
            last[rows[refused], drafted[refused, a[refused]]] = 0.0
            final = self.sampler.inverse_cdf(last, self.sampler.uniforms(steps + a))
        else:
            final = best[rows, a]
        accepted = a.tolist()
        emitted = [d[:n] + [t] for d, n, t in zip(drafts, accepted, final.tolist())]
        e.stats["verify_passes"] += 1
        e.stats["verify_row_passes"] += b
        e.stats["drafted"] += sum(len(d) for d in drafts)
        e.stats["accepted"] += sum(accepted)
        rate = sum(accepted) / b
        self.accept_mean = rate if self.accept_mean is None else 0.7 * self.accept_mean + 0.3 * rate
        if self.bandit is None and self.accept_mean < e.spec.min_accept:
            self.pause, self.accept_mean = e.spec.backoff_steps, None
        # Fed columns beyond the last token and the kept drafts hold rejected (or padding)
        # tokens: masked from now on, and cut from the cache once no row needs the column.
        self.mask[:, -(k + 1):] = (torch.arange(k + 1, device=self.dev) <= a.unsqueeze(1)).long()
        self._record(block, accepted)
        self.nxt = self.nxt + a + 1
        self.tok = final
        return emitted

    def _advance(self, emitted: list[list[int]]) -> None:
        """Append each running row's new tokens (up to an end-of-sequence or the budget) and take
        the rows that ended out of the batch: cache, mask, positions, streams."""
        import torch

        keep = []
        for b, tokens in enumerate(emitted):
            r, done = self.alive[b], False
            for t in tokens:
                if t in self.e.eos_ids:
                    self.finish[r], done = "stop", True
                    break
                self.gen[r].append(t)
                if len(self.gen[r]) >= self.max_new:
                    done = True
                    break
            if done:
                if self.lookup:
                    self.lookup.drop(r)
                continue
            if self.lookup:
                self.lookup.add(r, tokens)
            keep.append(b)
        if len(keep) < len(self.alive):
            self.alive = [self.alive[b] for b in keep]
            if not keep:
                return
            sel = torch.tensor(keep, device=self.dev)
            self.cache.batch_select_indices(sel)
            self.mask, self.nxt, self.tok = self.mask[sel], self.nxt[sel], self.tok[sel]
            if self.feat is not None:
                self.feat = self.feat[sel]
            if self.sampler:
                self.sampler.select(sel)
        self._drop_dead_columns()

    def _drop_dead_columns(self) -> None:
        """Cut the cache columns masked in every running row (a gone row's prompt padding,
        rejected drafts): attention over them is masked anyway, so this only saves work."""
        live = self.mask.any(0)  # (T,)
        if bool(live.all()) or any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
            return  # a sliding window's cache is not aligned with the mask's columns
        idx = live.nonzero().squeeze(1)
        for layer in self.cache.layers:
            if hasattr(layer, "keep_columns"):
                layer.keep_columns(idx)
            elif getattr(layer, "is_initialized", False):
                layer.keys, layer.values = layer.keys[:, :, idx], layer.values[:, :, idx]
        self.mask = self.mask[:, idx]
