"""Benchmark: the sample stage's core with the transformers back end, on the default teacher's shape.

    .venv/bin/python -m bench.sample_transformers [--examples 64] [--k 4] [--batch-size 512]
    .venv/bin/python -m bench.sample_transformers --model data/pretrain_demo/teacher --data data/ingest/train.jsonl \
        --examples 128 --engines generate,fast          # the trained teacher, its own lengths

An untrained teacher with the embedded default's architecture (params.yaml pretrain_demo.teacher_arch)
and tokenizer, sampled at the default settings (temperature 0.7, max_new_tokens 192). Untrained, it
rarely emits end-of-sequence, so every row runs the whole budget: the worst case, and the same work
for every variant compared. Prints the seconds of `steps.sample.sample` (the back end built once,
outside the timing) as a JSON line, the median of `--repeats` runs. With `--model` and `--data`:
a trained teacher on the split's first examples, whose completions end when the teacher ends them.
With several `--engines` (generate: transformers' model.generate; fast: steps.core.engine, finished
rows leave the batch), one line each, then the ratio of seconds and the share of completions that
are the same text on both (the same draws, up to float noise in a batch of another size).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="generate")
    ap.add_argument("--model", help="a trained teacher directory (with --data)")
    ap.add_argument("--data", help="with --model: example rows (data/ingest/train.jsonl)")
    args = ap.parse_args()
    if bool(args.model) != bool(args.data):
        ap.error("--model and --data go together")

    import torch

    from steps.core.backends import make_backend
    from steps.sample import SampleConfig, sample
    from tests.helpers import examples, tiny_model

    torch.set_num_threads(args.threads)
    arch = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain_demo"]["teacher_arch"]
    if args.data:
        lines = Path(args.data).read_text().splitlines()[: args.examples]
        rows = [json.loads(line) for line in lines]
    else:
        rows = examples(args.examples * 2 // 3 + 1, args.examples // 3 + 1)[: args.examples]
    texts: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model(Path(tmp) / "teacher", arch, rows))
        for engine in [e for e in args.engines.split(",") if e]:
            cfg = SampleConfig(k=args.k, temperature=0.7, max_new_tokens=args.max_new_tokens, shard_size=128,
                               backend_options={"batch_size": args.batch_size, "engine": engine})
            backend = make_backend("transformers", model=str(model), batch_size=args.batch_size, engine=engine)
            times = []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                out, _ = sample(cfg, rows, str(model), Path(tmp) / f"{engine}{r}", backend=backend)
                times.append(time.perf_counter() - t0)
                assert len(out) == len(rows) * args.k
            tokens = sum(c["completion_tokens"] for c in out)
            texts[engine] = [c["completion"] for c in sorted(out, key=lambda c: (c["id"], c["sample_idx"]))]
            seconds[engine] = statistics.median(times)
            print(json.dumps({"engine": engine, "examples": len(rows), "k": args.k, "batch_size": args.batch_size,
                              "seconds_median": round(seconds[engine], 2), "seconds": [round(t, 2) for t in times],
                              "completion_tokens": tokens}), flush=True)
    if "generate" in seconds and "fast" in seconds:
        same = sum(a == b for a, b in zip(texts["generate"], texts["fast"])) / len(texts["fast"])
        print(json.dumps({"fast_speedup": round(seconds["generate"] / seconds["fast"], 2),
                          "same_completion_share": round(same, 3)}))


if __name__ == "__main__":
    main()
