"""Benchmark: one decode pass of the policy, eager against `torch.compile`, side by side.

    .venv/bin/python -m bench.compile_pass [--model data/rft/model] [--rows 32,8] [--cache 120]

A rollout on these small models is a sequence of decode passes whose cost is framework work
around tiny tensors (README, TLT), so compiling the forward is the obvious lever. This times
`--passes` decode passes (one token per row, transformers' DynamicCache over a `--cache`-token
prompt, as the rollout engine calls the model) eager and under `torch.compile(dynamic=True)`,
for each batch size in `--rows`, in that order and in one process. Each side is called twice per
batch size and timed on the second call; the compiled model's first call is reported whole
(`compiled_call_s`): at the first batch size it carries the compilation, at a later one whatever
a change of batch size (which the engine's batch makes at every step of its tail) compiles
again. Prints one JSON line per batch size and a last one with `compiled_speedup` (eager ms per
pass ÷ compiled, the first batch size, steady state) and the seconds of those first calls.

`--experts grouped_mm,batched_mm` (a mixture-of-experts policy) repeats all of it with each of
transformers' experts kernels, in that order: under torch.compile with float32 weights
`grouped_mm`, transformers' default, loops over the experts outside the graph, and the engine's
compiled pass decodes with `batched_mm` (steps.core.engine.compiled_experts); each line then
names its kernel, and the last one adds `compiled_ms_by_experts`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ms_per_pass(model, rows: int, cache: int, passes: int) -> tuple[float, float]:
    """(ms per decode pass, seconds of the whole call: prefill, first pass and compilation included)."""
    import torch
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (rows, cache), generator=g)
    start = time.perf_counter()
    with torch.inference_mode():
        kv = DynamicCache(config=model.config)
        mask = torch.ones(rows, cache, dtype=torch.long)
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(cache).expand(rows, cache),
              past_key_values=kv, use_cache=True, logits_to_keep=1)
        tok = ids[:, -1:]
        t0 = None
        for i in range(passes + 1):  # the first pass is untimed: compilation of the decode graph
            if i == 1:
                t0 = time.perf_counter()
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            model(input_ids=tok, attention_mask=mask, position_ids=torch.full((rows, 1), cache + i),
                  past_key_values=kv, use_cache=True, logits_to_keep=1)
    end = time.perf_counter()
    return (end - t0) / passes * 1e3, end - start


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="data/rft/model")
    ap.add_argument("--rows", default="32,8", help="batch sizes, in order")
    ap.add_argument("--cache", type=int, default=120, help="prompt tokens in the cache before decoding")
    ap.add_argument("--passes", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", default="", help="MoE policies: experts kernels to compare, in order "
                                                   "(grouped_mm,batched_mm); default the model's own")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False  # no MoE router loss while decoding (as the engine)
    rows = [int(r) for r in args.rows.split(",")]
    kernels = [k for k in args.experts.split(",") if k] or [None]
    # transformers marks the experts modules whose kernel the config selects (use_experts_implementation)
    if kernels != [None] and not any(hasattr(m, "has_gate") for m in model.modules()):
        ap.error(f"--experts: {args.model} is not a mixture-of-experts model")
    lines = []
    for kernel in kernels:
        if kernel is not None:
            model.set_experts_implementation(kernel)
            torch._dynamo.reset()  # each kernel compiles its own graph, timed from scratch
        compiled = torch.compile(model, dynamic=True)
        for b in rows:
            ms_per_pass(model, b, args.cache, args.passes)  # warm-up, as for the compiled one
            eager_ms, _ = ms_per_pass(model, b, args.cache, args.passes)
            # The first call compiles (and recompiles while the cache grows, until its length is
            # symbolic); the second is the steady state a long run would see.
            _, comp_s = ms_per_pass(compiled, b, args.cache, args.passes)
            comp_ms, _ = ms_per_pass(compiled, b, args.cache, args.passes)
            line = {"rows": b, "eager_ms_per_pass": round(eager_ms, 3), "compiled_ms_per_pass": round(comp_ms, 3),
                    "compiled_call_s": round(comp_s, 1), "ratio": round(eager_ms / comp_ms, 3)}
            if kernel is not None:
                line = {"experts": kernel, **line}
            lines.append(line)
            print(json.dumps(line), flush=True)
    first = lines[0]
    last = {"model": args.model, "threads": args.threads, "torch": torch.__version__,
            "compiled_speedup": first["ratio"], "compile_s_first": first["compiled_call_s"],
            "compile_s_later_sizes": [ln["compiled_call_s"] for ln in lines[1:len(rows)]]}
    if kernels != [None]:
        last["compiled_ms_by_experts"] = {k: [ln["compiled_ms_per_pass"] for ln in lines if ln["experts"] == k]
                                          for k in kernels}
    print(json.dumps(last))


if __name__ == "__main__":
    main()
