"""Benchmark: the embedded default's pretraining step, one padded batch against length-sorted
micro-batches (`pretrain_demo.micro_batches`), side by side in one process.

    .venv/bin/python -m bench.pretrain_batching [--steps 12] [--parts 1 2 4] [--model teacher]

Needs `data/ingest/train.jsonl` (`dvc repro ingest`). Each setting trains a freshly initialised
model of params.yaml's architecture for `--steps` steps on the same traces (same seed); the same
gradient either way (tests/test_pretrain_batching.py), so only the time differs. The last line is
JSON: seconds per step for each setting and the speed-up of each against one part.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    import torch

    from steps.core import modeling
    from steps.core.config import load_config
    from steps.core.schemas import EXAMPLES, read_validated
    from steps.pretrain_demo import PretrainDemoConfig, corpus_texts, train_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--parts", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--model", choices=("teacher", "student_base"), default="teacher")
    args = ap.parse_args()
    base = load_config(PretrainDemoConfig, "pretrain_demo", str(ROOT / "params.yaml"))
    torch.set_num_threads(base.threads)
    train = read_validated(ROOT / "data" / "ingest" / "train.jsonl", EXAMPLES)
    tok = modeling.build_tokenizer(corpus_texts(train))
    arch = base.teacher_arch if args.model == "teacher" else base.student_arch
    p_wrong, p_unhelpful = ((base.teacher_p_wrong, base.teacher_p_unhelpful) if args.model == "teacher"
                            else (base.student_p_wrong, base.student_p_unhelpful))
    per_step = {}
    for parts in args.parts:
        cfg = dataclasses.replace(base, micro_batches=parts)
        model = modeling.build_model(arch, len(tok), tok, 0)
        t0 = time.perf_counter()
        train_lm(model, tok, train, args.steps, cfg, p_wrong, p_unhelpful, cfg.max_fillers, 0, args.model)
        per_step[parts] = (time.perf_counter() - t0) / args.steps
        print(f"{args.model}, batch {cfg.batch_size} in {parts} part(s): {per_step[parts]:.3f} s/step", flush=True)
    one = per_step.get(1)
    print(json.dumps({"model": args.model, "s_per_step": per_step,
                      "speedup_vs_one_part": {k: round(one / v, 3) for k, v in per_step.items()} if one else None}))


if __name__ == "__main__":
    main()
