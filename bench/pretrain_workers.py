"""Benchmark: the pretrain_demo stage's two models trained one after the other in one process
with 2 threads (the former default) against two 1-thread processes at once (`workers: 2`,
`threads: 1`, the default), side by side in one run.

    .venv/bin/python -m bench.pretrain_workers [--steps 40]

Needs `data/ingest/train.jsonl` (`dvc repro ingest`). Both settings run steps.pretrain_demo's
own `pretrain` on the same data, with params.yaml's architectures and `--steps` steps for each
model. The last line is JSON: wall seconds for each setting and the speed-up.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from steps.core.config import load_config
    from steps.core.schemas import EXAMPLES, read_validated
    from steps.pretrain_demo import PretrainDemoConfig, pretrain

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    base = load_config(PretrainDemoConfig, "pretrain_demo", str(ROOT / "params.yaml"))
    base = dataclasses.replace(base, teacher_steps=args.steps, student_steps=args.steps)
    train = read_validated(ROOT / "data" / "ingest" / "train.jsonl", EXAMPLES)
    settings = {"one process, 2 threads": dataclasses.replace(base, workers=1, threads=2),
                "two processes, 1 thread each": dataclasses.replace(base, workers=2, threads=1)}
    wall = {}
    for name, cfg in settings.items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            pretrain(cfg, train, Path(tmp))
            wall[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {wall[name]} s for {args.steps} teacher + {args.steps} student steps", flush=True)
    one, two = wall.values()
    print(json.dumps({"steps_per_model": args.steps, "wall_s": wall, "speedup": round(one / two, 2)}))


if __name__ == "__main__":
    main()
