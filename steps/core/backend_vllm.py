"""The in-process vLLM engine as a generation back end (the `vllm` image, or `.venv-vllm` here).

    sample: {backend: vllm, backend_options: {tensor_parallel_size: 8, gpu_memory_utilization: 0.9}}
    sample: {backend: vllm, python: .venv-vllm/bin/python,                     # on a CPU machine
             backend_options: {max_model_len: 1024, enforce_eager: true, kv_cache_memory_bytes: 1073741824}}

Every option but `batch_size` goes to `vllm.LLM` as an engine argument. Prompts go in as
token ids of the rendered text (the tokenizer's chat template, tokenised without special
tokens exactly as the transformers back end does), so `<think>` handling and a template's own
BOS do not depend on the engine. Sampling seeds are per (prompt, sample index), as everywhere
else. vLLM is imported only when this back end is built, and its engine starts worker
processes: a script that builds it needs an `if __name__ == "__main__":` guard (the stages
have one). On CPU, vLLM's attention kernels take head sizes 32, 64, 80, 96, ... only, and
chunked prefill is turned off (below); a vLLM server on CPU needs `--no-enable-chunked-prefill`
for the same reason.
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
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # vLLM 0.32's CPU engine fails ("CPU Generator does not use offset") when the prefill
            # of a seeded request is split across steps, and every request here is seeded.
            engine_options.setdefault("enable_chunked_prefill", False)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.engine = LLM(model=model, tokenizer=model, **engine_options)
        self.batch_size = batch_size
        self.model_name = model

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams,
                 on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
                 ) -> list[list[Completion]]:
        from vllm import SamplingParams as VSampling
        from vllm.inputs import TokensPrompt

        ids = [self.tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]
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
            outs = self.engine.generate([TokensPrompt(prompt_token_ids=ids[i]) for i, _ in requests], params,
                                        use_tqdm=False)
            elapsed = time.perf_counter() - t0
            for (i, _), out in zip(requests, outs, strict=True):
                o = out.outputs[0]
                # A finished sequence's ids end with the end-of-sequence token, which the
                # Completion contract leaves out of the ids and the count.
                gen = list(o.token_ids)[: len(o.token_ids) - (o.finish_reason == "stop")]
                results[i].append(Completion(
                    text=o.text.strip(), completion_tokens=len(gen),
                    finish_reason="length" if o.finish_reason == "length" else "stop",
                    prompt_tokens=len(ids[i]), latency_s=elapsed / len(idx), token_ids=tuple(gen)))
            if on_batch:
                on_batch(idx, [results[i] for i in idx])
        return results

    def close(self) -> None:
        # Stop the engine's worker processes (they hold the weights and the KV cache) now,
        # not at interpreter exit: the evaluate stage builds one back end per model.
        if self.engine is not None:
            self.engine.llm_engine.engine_core.shutdown()
            self.engine = None
