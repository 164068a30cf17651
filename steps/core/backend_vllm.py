"""The in-process vLLM engine as a generation back end (GPU containers: the `vllm` image).

    sample: {backend: vllm, backend_options: {tensor_parallel_size: 8, gpu_memory_utilization: 0.9}}

Prompts go in as rendered text (the tokenizer's chat template, exactly as for the
transformers back end), so `<think>` handling does not depend on the engine. Sampling seeds
are per (prompt, sample index), as everywhere else. vLLM is imported only when this back end
is built: CPU machines never import it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from steps.core.backends import Completion, SamplingParams, derive_seed
from steps.core.prompts import Prompt


class VLLMBackend:
    name = "vllm"

    def __init__(self, model: str, batch_size: int = 256, **engine_options: Any):
        from transformers import AutoTokenizer
        from vllm import LLM

        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.engine = LLM(model=model, tokenizer=model, **engine_options)
        self.batch_size = batch_size
        self.model_name = model

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams,
                 on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
                 ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSampling

        results: list[list[Completion]] = [[] for _ in prompts]
        for start in range(0, len(prompts), self.batch_size):
            idx = list(range(start, min(start + self.batch_size, len(prompts))))
            # One request per (prompt, sample): each gets its own seed, so a resumed run
            # regenerates exactly the samples it lost.
            requests = [(i, j) for i in idx for j in range(sampling.n)]
            params = [VSampling(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_new_tokens,
                                seed=derive_seed(sampling.seed, prompts[i].key, j)) for i, j in requests]
            t0 = time.perf_counter()
            outs = self.engine.generate([prompts[i].text for i, _ in requests], params, use_tqdm=False)
            elapsed = time.perf_counter() - t0
            for (i, _), out in zip(requests, outs, strict=True):
                o = out.outputs[0]
                results[i].append(Completion(
                    text=o.text.strip(), completion_tokens=len(o.token_ids),
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    prompt_tokens=len(out.prompt_token_ids or []), latency_s=elapsed / len(idx)))
            if on_batch:
                on_batch(idx, [results[i] for i in idx])
        return results

    def close(self) -> None:
        self.engine = None
