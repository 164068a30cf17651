"""Does a call pay for a router policy? The probe behind the README's Router-R1 diagnosis.

Samples `--samples` routed responses per prompt (temperature 1, as GRPO's rollouts) from one or
more policies, with the pool and limits of params.yaml `router`, on `--n` prompts of each dataset
(dev by default; `--split` reads another file, e.g. the training prompts RL sees). Per dataset and
per kind of response (no call, or the member called), it prints how many responses break no
format rule (steps/core/rewards/router.py), how many are also right (EM), the mean reward at
alpha 0 (-1 when the format breaks, else EM) and the mean group advantage GRPO would give them
(the reward z-scored within each prompt's samples): a kind with a positive advantage is one that
GRPO makes more likely. Also: how often the search's query is the question word for word.

    .venv/bin/python bench/router_calls.py data/router/warmup/model OTHER/warmup/model
    .venv/bin/python bench/router_calls.py data/router/warmup/model --split data/ingest/train.jsonl --samples 8

Needs the split file and the pool's models (`dvc repro router` makes both).
"""
import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steps.core import prompts as P  # noqa: E402
from steps.core.backends import SamplingParams, TransformersBackend  # noqa: E402
from steps.core.config import load_config  # noqa: E402
from steps.core.rewards.router import _BLOCK, format_violation, outcome_score, parse_search  # noqa: E402
from steps.core.rollouts.router import RouterRollout  # noqa: E402
from steps.core.schemas import EXAMPLES, read_validated  # noqa: E402
from steps.router import RouterConfig, routing_prompt_rows  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("models", nargs="+", help="router policy directories")
ap.add_argument("--params", default=str(ROOT / "params.yaml"))
ap.add_argument("--split", default=str(ROOT / "data/ingest/dev.jsonl"))
ap.add_argument("--n", type=int, default=32, help="prompts per dataset")
ap.add_argument("--dataset", action="append", help="only this dataset (repeatable; default: each in the split)")
ap.add_argument("--samples", type=int, default=4, help="responses per prompt")
ap.add_argument("--seed", type=int, default=7)
a = ap.parse_args()

cfg = load_config(RouterConfig, "router", a.params)
split = read_validated(a.split, EXAMPLES)
datasets = a.dataset or list(dict.fromkeys(e["dataset"] for e in split))
# The splits are grouped by dataset: their first rows are one dataset's only.
examples = [e for d in datasets for e in [x for x in split if x["dataset"] == d][: a.n]]
print(f"{Path(a.split).name}: {a.n} prompts of each of {', '.join(datasets)} x {a.samples} samples, temperature 1")
for model in a.models:
    rows = routing_prompt_rows(cfg, examples, model)
    rollout = RouterRollout(TransformersBackend(model, threads=cfg.threads), **cfg.rollout_options())
    prompts = [P.Prompt(messages=(), text=r["prompt"], key=r["id"]) for r in rows]
    outs = rollout.run(prompts, SamplingParams(n=a.samples, temperature=1.0, max_new_tokens=cfg.max_completion_length,
                                               seed=a.seed))
    rollout.close()
    stats: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    verbatim: dict[str, list[int]] = defaultdict(list)
    for e, responses in zip(examples, outs, strict=True):
        group = []
        for r in responses:
            ok = format_violation(r.text, cfg.member_names()) is None
            right = ok and outcome_score(r.text, e["answers"]) > 0
            searches = [parse_search(c) for kind, c in _BLOCK.findall(r.text) if kind == "search"]
            called = r.meta["calls"] + r.meta["invalid_searches"] + r.meta["unknown_member_calls"]
            kind = "no call" if not called else "+".join(sorted({s[0] for s in searches if s})) or "malformed search"
            verbatim[e["dataset"]] += [int(s[1] == e["question"].strip()) for s in searches if s]
            group.append((kind, ok, right, -1.0 if not ok else float(right)))
        mean, std = statistics.mean(g[3] for g in group), statistics.pstdev(g[3] for g in group)
        for kind, ok, right, reward in group:
            s = stats[e["dataset"], kind]
            s["ok"].append(ok)
            s["right"].append(right)
            s["reward"].append(reward)
            s["advantage"].append((reward - mean) / std if std else 0.0)
    print(f"\n{model}")
    print(f"  {'dataset':10s} {'response':22s} {'n':>5s} {'well-formed':>12s} {'right':>6s} {'reward':>7s} {'advantage':>10s}")
    for (d, kind), s in sorted(stats.items(), key=lambda kv: (kv[0][0], kv[0][1] != "no call", kv[0][1])):
        n = len(s["ok"])
        print(f"  {d:10s} {kind:22s} {n:5d} {sum(s['ok']):12d} {sum(s['right']):6d} "
              f"{statistics.mean(s['reward']):+7.2f} {statistics.mean(s['advantage']):+10.2f}")
        print(json.dumps({"model": model, "dataset": d, "response": kind, "n": n, "well_formed": sum(s["ok"]),
                          "right": sum(s["right"]), "reward": round(statistics.mean(s["reward"]), 3),
                          "advantage": round(statistics.mean(s["advantage"]), 3)}))
    for d, v in verbatim.items():
        print(f"  {d}: the query is the question word for word in {sum(v)} of {len(v)} searches")
