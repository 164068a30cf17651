"""Do a router policy's calls come out well-formed? The probe behind the README's Router-R1 diagnosis.

Samples `--samples` routed responses per dev prompt (temperature 1, as GRPO's rollouts) from one or
more policies, with the pool and limits of params.yaml `router`, and counts, for responses with a
call and without one: how many break no format rule (steps/core/rewards/router.py) and how many are
also right (EM). Side by side, e.g. the warm-up policy of 60 steps against one of 240:

    .venv/bin/python bench/router_calls.py data/router/warmup/model OTHER/warmup/model

Needs data/ingest/dev.jsonl and the pool's models (`dvc repro router` makes both).
"""
import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steps.core import prompts as P  # noqa: E402
from steps.core.backends import SamplingParams, TransformersBackend  # noqa: E402
from steps.core.config import load_config  # noqa: E402
from steps.core.rewards.router import format_violation, outcome_score  # noqa: E402
from steps.core.rollouts.router import RouterRollout  # noqa: E402
from steps.core.schemas import EXAMPLES, read_validated  # noqa: E402
from steps.router import RouterConfig, routing_prompt_rows  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("models", nargs="+", help="router policy directories")
ap.add_argument("--params", default=str(ROOT / "params.yaml"))
ap.add_argument("--dev", default=str(ROOT / "data/ingest/dev.jsonl"))
ap.add_argument("--n", type=int, default=32, help="dev prompts per dataset")
ap.add_argument("--dataset", action="append", help="only this dataset (repeatable; default: each in dev.jsonl, --n of each)")
ap.add_argument("--samples", type=int, default=4, help="responses per prompt")
ap.add_argument("--seed", type=int, default=7)
a = ap.parse_args()

cfg = load_config(RouterConfig, "router", a.params)
dev = read_validated(a.dev, EXAMPLES)
datasets = a.dataset or list(dict.fromkeys(e["dataset"] for e in dev))
# dev.jsonl is grouped by dataset: its first rows are one dataset's only.
examples = [e for d in datasets for e in [x for x in dev if x["dataset"] == d][: a.n]]
print(f"{a.n} dev prompts of each of {', '.join(datasets)} x {a.samples} samples, temperature 1")
print(f"{'policy':50s} {'with a call: n / well-formed / right':>38s} {'without: n / well-formed / right':>34s}")
for model in a.models:
    rows = routing_prompt_rows(cfg, examples, model)
    rollout = RouterRollout(TransformersBackend(model, threads=cfg.threads), **cfg.rollout_options())
    prompts = [P.Prompt(messages=(), text=r["prompt"], key=r["id"]) for r in rows]
    outs = rollout.run(prompts, SamplingParams(n=a.samples, temperature=1.0, max_new_tokens=cfg.max_completion_length,
                                               seed=a.seed))
    counts = {(d, called): [0, 0, 0] for d in datasets for called in (True, False)}
    for e, responses in zip(examples, outs, strict=True):
        for r in responses:
            called = bool(r.meta["calls"] + r.meta["invalid_searches"] + r.meta["unknown_member_calls"])
            ok = format_violation(r.text, cfg.member_names()) is None
            c = counts[e["dataset"], called]
            c[0] += 1
            c[1] += ok
            c[2] += ok and outcome_score(r.text, e["answers"]) > 0
    rollout.close()
    for d in datasets:
        print(f"{model + ' ' + d:50s} {' / '.join(map(str, counts[d, True])):>38s} {' / '.join(map(str, counts[d, False])):>34s}")
        print(json.dumps({"model": model, "dataset": d, "call": counts[d, True], "no_call": counts[d, False]}))
