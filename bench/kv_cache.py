"""Benchmark: the engine's KV cache, written in place, against transformers' `DynamicLayer`, which
concatenates (a new tensor and a copy of the whole cache, per layer, keys and values, every step).

    .venv/bin/python -m bench.kv_cache                        # data/rft/model, its GRPO prompts
    .venv/bin/python -m bench.kv_cache --prompt-repeat 1,12   # as they are, and 12 times as long

One process, one policy, the same prompts and seeds (a GRPO step's shape: `--prompts` x `--k`
completions, temperature 1, `--max-new-tokens`); the two caches go round robin (round r decodes
prompts r with each, in alternating order), so a slow stretch of a shared machine falls on both.
`--prompt-repeat N` repeats each prompt's text N times: the embedded default's prompts are about
60 tokens, a real multi-document question's a thousand or more, and the copy that concatenation
costs grows with the cache. Prints a JSON line per prompt length (median rollout seconds of each
cache, tokens/s, `speedup` = DynamicLayer's median ÷ ours, the per-round ratios, and whether both
decoded the same tokens in every round: they must, the cache only stores what it is given).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(ROOT / "data/rft/model"))
    ap.add_argument("--data", default=str(ROOT / "data/ingest/train.jsonl"))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds after one untimed")
    ap.add_argument("--prompt-repeat", default="1,12")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not Path(args.model).is_dir():
        ap.error(f"--model {args.model}: no such model directory (dvc repro rft makes data/rft/model)")

    import torch
    from transformers.cache_utils import DynamicLayer

    import steps.core.engine as engine_mod
    from bench.rollouts import build_policy
    from steps.core.engine import FastEngine

    torch.set_num_threads(args.threads)
    n_texts = args.prompts * (args.rounds + 1)
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, texts, _ = build_policy(Path(tmp), args.model, args.data, n_texts)
    model.eval()
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False  # a training term; generation_mode turns it off too

    class Concatenating(DynamicLayer):  # the peer: transformers' own layer, `reserve` ignored
        def __init__(self, reserve: int):
            super().__init__()

    ours = engine_mod._growing_layer_class
    caches = {"in_place": ours, "concat": lambda: Concatenating}
    engine = FastEngine(model, eos_ids=[tok.eos_token_id], pad_id=tok.pad_token_id or 0)
    for repeat in [int(x) for x in args.prompt_repeat.split(",")]:
        times: dict[str, list[float]] = {name: [] for name in caches}
        tokens: dict[str, list[int]] = {name: [] for name in caches}
        same = True
        for r in range(args.rounds + 1):
            batch = [" ".join([t] * repeat) for t in texts[r * args.prompts:(r + 1) * args.prompts]]
            ids = [tok(t, add_special_tokens=False)["input_ids"] for t in batch for _ in range(args.k)]
            seeds = list(range(r * 1000, r * 1000 + len(ids)))
            outs = {}
            for name in (list(caches) if r % 2 == 0 else list(caches)[::-1]):
                engine_mod._growing_layer_class = caches[name]
                t0 = time.perf_counter()
                outs[name] = engine.generate(ids, seeds=seeds, temperature=1.0, max_new_tokens=args.max_new_tokens)
                if r:  # round 0: untimed
                    times[name].append(time.perf_counter() - t0)
                    tokens[name].append(sum(len(o.token_ids) for o in outs[name]))
            engine_mod._growing_layer_class = ours
            same &= [o.token_ids for o in outs["in_place"]] == [o.token_ids for o in outs["concat"]]
        med = {name: statistics.median(v) for name, v in times.items()}
        print(json.dumps({
            "prompt_repeat": repeat, "prompt_tokens_mean": round(statistics.mean(len(i) for i in ids), 1),
            "rows": len(ids), **{f"{n}_median_s": round(med[n], 3) for n in caches},
            **{f"{n}_tokens_per_s": round(statistics.mean(tokens[n]) / med[n], 1) for n in caches},
            "speedup": round(med["concat"] / med["in_place"], 3),
            "speedup_rounds": [round(c / i, 3) for i, c in zip(times["in_place"], times["concat"])],
            "same_tokens": same}), flush=True)


if __name__ == "__main__":
    main()
