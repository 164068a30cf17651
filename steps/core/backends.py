"""Generation back ends: one protocol, chosen by name in params.

    backend = make_backend("transformers", model="data/pretrain_demo/teacher")
    outs = backend.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=128))
    outs[i][j].text, outs[i][j].completion_tokens, outs[i][j].finish_reason

Implementations are imported lazily by name so that a CPU machine never imports vLLM and
`import steps` stays fast. `transformers` runs in-process; `vllm` and `openai` (any
OpenAI-compatible endpoint) take the same `Prompt` objects: text for engines that tokenise
themselves, chat messages for servers that apply the chat template.
"""
from __future__ import annotations

import hashlib
import importlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from steps.core.prompts import Prompt


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Completion:
    text: str  # `<think> T </think> R` (a separate reasoning field is folded in by the back end)
    completion_tokens: int  # generated tokens, thinking included, end-of-sequence excluded
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int = 0
    latency_s: float = 0.0  # wall time of the request or batch, shared out per completion
    token_ids: tuple[int, ...] = ()  # the generated ids, end-of-sequence excluded (() where unknown: a server)
    tokens_estimated: bool = False  # the counts were made here, not by the server (it sent no `usage`)


class GenerationBackend(Protocol):
    name: str

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams,
                 on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
                 ) -> list[list[Completion]]:
        """n completions per prompt, in prompt order. `on_batch(indices, completions)` is called
        as results arrive, so a caller can persist them before the whole call returns."""
        ...

    def close(self) -> None: ...


REGISTRY: dict[str, str] = {
    "transformers": "steps.core.backends:TransformersBackend",
    "vllm": "steps.core.backend_vllm:VLLMBackend",
    "openai": "steps.core.backend_openai:OpenAIBackend",
}


def register(name: str, target: str) -> None:
    """Register a back end as "module:Class" (imported only when used)."""
    REGISTRY[name] = target


def backend_class(name: str) -> type:
    """The class registered as `name` (its module imported now; vLLM itself only on build)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown generation backend {name!r}; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, **options: Any) -> GenerationBackend:
    return backend_class(name)(**options)


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed from (base seed, stage, row id, ...): no global random state."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


ENGINES = ("generate", "fast")


class TransformersBackend:
    """In-process decoding, batched, shortest prompts together to save padding. `engine`:
    `generate` (transformers' `model.generate`) or `fast` (steps.core.engine: finished rows
    leave the batch; the same draws, so the same completions up to float noise)."""

    name = "transformers"
    # Each row draws from its own stream (RowSampler), so the batch size changes no completion.
    TRANSPORT_OPTIONS = frozenset({"batch_size"})

    def __init__(self, model: str, batch_size: int = 64, dtype: str = "float32", device: str = "auto",
                 model_obj: Any = None, tokenizer_obj: Any = None, threads: int | None = None,
                 engine: str = "generate", speculative: dict | None = None, spec_state: Any = None,
                 compile: bool = False):
        if engine not in ENGINES:
            raise ValueError(f"backend_options.engine: unknown engine {engine!r}; known: {list(ENGINES)}")
        if speculative and engine != "fast":
            raise ValueError("backend_options.speculative: speculative decoding needs engine: fast")
        if not isinstance(compile, bool):
            raise ValueError(f"backend_options.compile: expected true or false, got {compile!r}")
        if compile and engine != "fast":
            raise ValueError("backend_options.compile: compiling is an option of engine: fast")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from steps.core.engine import SpecConfig

        self.speculative = SpecConfig.from_options(speculative, "backend_options.speculative")

        if threads:
            torch.set_num_threads(threads)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = tokenizer_obj or AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = model_obj or AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype))
        if getattr(self.model.config, "output_router_logits", False):
            # The MoE router loss is a training term; computing it during cached, masked
            # generation fails in transformers (shape mismatch) and costs time.
            self.model.config.output_router_logits = False
        self.model.to(self.device).eval()
        self.batch_size = batch_size
        self.model_name = model
        self.engine = engine
        self.compile = compile  # engine fast: torch.compile the decode pass (steps.core.engine.compiled_pass)
        self.spec_state = spec_state  # the drafter and bandit an RL stage keeps across steps (steps.core.drafter)

    def generate(self, prompts, sampling, on_batch=None):
        tok = self.tokenizer
        encoded = [tok(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        per_batch = max(1, self.batch_size // sampling.n)
        results: list[list[Completion]] = [[] for _ in prompts]
        eos_ids = set(self._eos_ids())
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            # Each prompt repeated n times (rows b*n .. b*n+n-1), as num_return_sequences would:
            # transformers allows that option with sampling only, and the draws here are ours:
            # the draw for (prompt, sample j) comes from that row's own random stream
            # (RowSampler), so it does not depend on which prompts share the batch.
            rows = [encoded[i] for i in idx for _ in range(sampling.n)]
            seeds = [derive_seed(sampling.seed, prompts[i].key, j) for i in idx for j in range(sampling.n)]
            t0 = time.perf_counter()
            gen = (self._fast(rows, seeds, sampling) if self.engine == "fast"
                   else self._generate(rows, seeds, sampling, eos_ids))  # B*n (ids, stopped)
            elapsed = time.perf_counter() - t0
            for b, i in enumerate(idx):
                comps = []
                for j in range(sampling.n):
                    kept, stopped = gen[b * sampling.n + j]
                    comps.append(Completion(
                        text=tok.decode(kept, skip_special_tokens=True).strip(),
                        completion_tokens=len(kept), finish_reason="stop" if stopped else "length",
                        prompt_tokens=len(encoded[i]), latency_s=elapsed / len(idx), token_ids=tuple(kept)))
                results[i] = comps
            if on_batch:
                on_batch(idx, [results[i] for i in idx])
        return results

    def _generate(self, rows: list[list[int]], seeds: list[int], sampling: SamplingParams,
                  eos_ids: set[int]) -> list[tuple[list[int], bool]]:
        """model.generate: greedy decoding over scores that RowSampler has already reduced to
        one token per row (model.generate's own sampling draws from one global generator
        across the whole batch)."""
        import torch

        tok = self.tokenizer
        batch = tok.pad({"input_ids": rows}, return_tensors="pt").to(self.device)
        sampler = (RowSampler(seeds, sampling.temperature, sampling.top_p, batch["input_ids"].shape[1], self.device)
                   if sampling.temperature > 0 else None)
        with torch.inference_mode():
            out = self.model.generate(
                **batch, do_sample=False, max_new_tokens=sampling.max_new_tokens,
                temperature=None, top_p=None, top_k=None,
                logits_processor=[sampler] if sampler else None,
                pad_token_id=tok.pad_token_id,
                eos_token_id=list(eos_ids))
        results = []
        for ids in out[:, batch["input_ids"].shape[1]:].tolist():  # (B*n, T_new), padded after a stop
            stop = next((k for k, t in enumerate(ids) if t in eos_ids), None)
            results.append((ids, False) if stop is None else (ids[:stop], True))
        return results

    def _fast(self, rows: list[list[int]], seeds: list[int], sampling: SamplingParams) -> list[tuple[list[int], bool]]:
        from steps.core.engine import FastEngine

        engine = FastEngine(self.model, self._eos_ids(), self.tokenizer.pad_token_id, self.speculative,
                            state=self.spec_state, compile=self.compile)
        outs = engine.generate(rows, seeds, sampling.temperature, sampling.top_p, sampling.max_new_tokens)
        self.last_stats = dict(engine.stats)
        return [(list(o.token_ids), o.finish_reason == "stop") for o in outs]

    def _eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = ids if isinstance(ids, list) else [ids]
        return [i for i in ids + [self.tokenizer.eos_token_id] if i is not None]

    def close(self) -> None:
        self.model = None


_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9
_STREAM32 = 0x5BD1E995


def _mix32(x: Any) -> Any:
    """A 32-bit integer hash (good avalanche) on an int64 tensor of values below 2**32; every
    product stays below 2**59, so int64 arithmetic is exact on every device."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return (x >> 16) ^ x


class RowSampler:
    """A logits processor that draws one token per row from that row's own random stream and
    returns scores with only that token left (0 for it, -inf elsewhere), for greedy decoding to
    pick. The stream is counter-based: the uniform number for row r at generated position t is
    a hash of (the row's seed, t), so it is the same whatever else shares the batch, and costs
    a few vectorised integer operations per step (one torch.Generator per row would cost a
    Python loop over the rows at every step). Temperature, then nucleus (top_p) filtering,
    then inverse-CDF sampling (in float32: a (rows, vocabulary) float64 copy would double the
    memory of a 150k-token vocabulary at batch 512, for a bias far below sampling noise)."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float, prompt_len: int, device: Any):
        import torch

        self.keys = _mix32(torch.tensor(list(seeds), dtype=torch.int64, device=device) & _MASK32)
        self.temperature, self.top_p, self.prompt_len = temperature, top_p, prompt_len

    def uniforms(self, step: Any, stream: int = 0) -> Any:
        """(R,) float32 in (0, 1): row r's draw at generated position `step` (an int, or an (R,)
        tensor when rows are at different positions; an (R, k) tensor gives (R, k), k positions
        a row). `stream` 1 is a second, independent stream (speculative decoding's accept tests;
        0 is the one every token is drawn from)."""
        keys = _mix32((self.keys ^ _STREAM32) & _MASK32) if stream else self.keys
        if getattr(step, "ndim", 0) == 2:
            keys = keys.unsqueeze(1)
        bits = _mix32((keys + step * _GOLDEN32) & _MASK32)
        return ((bits.double() + 0.5) / 2.0 ** 32).float()

    def probs(self, scores: Any) -> Any:
        """(R, V) the distribution a row draws from: softmax at the temperature, then top_p."""
        import torch

        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
            sorted_p = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < self.top_p)
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return probs / probs.sum(-1, keepdim=True)

    @staticmethod
    def inverse_cdf(probs: Any, u: Any) -> Any:
        """(R,) a token per row from (R, V) non-negative weights and (R,) uniforms."""
        import torch

        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)
        last = cdf.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
        return torch.minimum(pick, last).squeeze(1)

    def select(self, rows: Any) -> None:
        """Keep only these rows' streams (the fast engine drops finished rows from its batch)."""
        self.keys = self.keys[rows]

    def draw(self, scores: Any, step: Any) -> Any:
        """(R,) the token each row draws from `scores` (R, V) at generated position `step`."""
        import torch

        u = self.uniforms(step)  # (R,)
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (R, V)
        if self.top_p < 1.0:
            probs, order = probs.sort(dim=-1, descending=True, stable=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            probs = probs * ((probs.cumsum(-1) - probs) < self.top_p)
        cdf = probs.cumsum(-1)  # (R, V)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)  # (R, 1)
        # In float32 u * total can round up to the total: then take the last token with mass,
        # never one past it (a token cut by top_p, or off the end).
        last = cdf.shape[1] - 1 - (probs > 0).flip(-1).int().argmax(-1, keepdim=True)
        pick = torch.minimum(pick, last)
        if self.top_p < 1.0:
            pick = order.gather(1, pick)
        return pick.squeeze(1)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        pick = self.draw(scores, input_ids.shape[1] - self.prompt_len)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, pick.unsqueeze(1), 0.0)
