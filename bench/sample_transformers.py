"""Benchmark: the sample stage's core with the transformers back end, on the default teacher's shape.

    .venv/bin/python -m bench.sample_transformers [--examples 64] [--k 4] [--batch-size 512]

An untrained teacher with the embedded default's architecture (params.yaml pretrain_demo.teacher_arch)
and tokenizer, sampled at the default settings (temperature 0.7, max_new_tokens 192). Untrained, it
rarely emits end-of-sequence, so every row runs the whole budget: the worst case, and the same work
for every variant compared. Prints the seconds of `steps.sample.sample` (the back end built once,
outside the timing) as a JSON line, the median of `--repeats` runs.
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
    args = ap.parse_args()

    import torch

    from steps.core.backends import make_backend
    from steps.sample import SampleConfig, sample
    from tests.helpers import examples, tiny_model

    torch.set_num_threads(args.threads)
    arch = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain_demo"]["teacher_arch"]
    rows = examples(args.examples * 2 // 3 + 1, args.examples // 3 + 1)[: args.examples]
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "teacher", arch, rows)
        cfg = SampleConfig(k=args.k, temperature=0.7, max_new_tokens=args.max_new_tokens, shard_size=128,
                           backend_options={"batch_size": args.batch_size})
        backend = make_backend("transformers", model=str(model), batch_size=args.batch_size)
        for r in range(args.repeats):
            t0 = time.perf_counter()
            out, _ = sample(cfg, rows, str(model), Path(tmp) / f"work{r}", backend=backend)
            times.append(time.perf_counter() - t0)
            assert len(out) == len(rows) * args.k
        tokens = sum(c["completion_tokens"] for c in out)
    print(json.dumps({"examples": len(rows), "k": args.k, "batch_size": args.batch_size,
                      "seconds_median": round(statistics.median(times), 2), "seconds": [round(t, 2) for t in times],
                      "completion_tokens": tokens}))


if __name__ == "__main__":
    main()
