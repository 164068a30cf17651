"""Benchmark: TLT's fast rollouts inside a real GRPO run, side by side in one invocation.

    .venv/bin/python -m bench.tlt_grpo --steps 50                   # needs data/rft/model (dvc repro rft)
    .venv/bin/python -m bench.tlt_grpo --steps 50 --configs generate,online

Each config runs the grpo stage itself (`python -m steps.grpo`, a process of its own, params.yaml's
grpo section with `max_steps` and the rollout engine overridden) from the same RFT policy, seed and
prompts, one after the other:

- `generate`: the stage's default rollout, transformers' `model.generate` (what TRL's default
  generation runs on this machine);
- `fast`: steps.core.engine, finished rows leave the batch, no speculation;
- `frozen`: the engine with the EAGLE-style drafter trained once (on the first rollout's
  features, `init_steps`) and never again, the draft depth picked by the bandit;
- `online`: the same drafter trained `train_steps` more after every rollout (TLT);
- `fast_compiled`, `online_compiled`: `fast` and `online` with `compile: true` (the decode pass
  through torch.compile; its compiling falls in the first steps: the median step hides it, the
  mean and the wall clock do not).

Step time is TRL's own `step_time` (rollout, the drafter's training, the loss and the optimiser
step); acceptance is drafts kept per row and verification pass (`spec/accepted_per_pass`; TLT's
accepted length less the one token a pass always yields). Prints one JSON line per config and a
last line with `step_speedup` (median step time of `generate` over `online`), `step_speedup_<config>`
for the others and `wall_speedup_<config>` (the whole run's wall clock, process start included),
`acceptance_online` and `acceptance_frozen` (mean over the last 10 steps), and the ratios of
rollout tokens per second of step time; draws reports/plots/tlt_grpo.png (acceptance and step
time over training). `--rounds N` runs the configs round robin N times (generate, online,
generate, online, ...) and gives each ratio per round (`*_rounds`) and their median: the speed of
a shared machine drifts over the minutes one run takes.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Speculation over the whole 64-row batch (params.yaml's 8 prompts x 8), not only below the
# reference's 32 rows: on two CPU cores a verification pass costs little more than a plain one, and
# the bandit keeps a plain step among its arms. Measured side by side, two rounds each: step_speedup
# 1.27 / 1.33 with 64 against 1.18 / 1.15 with 32 (README, TLT).
SPEC = {"drafter": "eagle", "depth": "bandit", "draft_tokens": 4, "max_batch": 64, "epsilon": 0.1}
CONFIGS: dict[str, dict[str, Any]] = {
    "generate": {"engine": "generate", "speculative": {}},
    "fast": {"engine": "fast", "speculative": {}},
    "frozen": {"engine": "fast", "speculative": {**SPEC, "online": False}},
    "online": {"engine": "fast", "speculative": {**SPEC, "online": True}},
    "fast_compiled": {"engine": "fast", "compile": True, "speculative": {}},
    "online_compiled": {"engine": "fast", "compile": True, "speculative": {**SPEC, "online": True}},
}
SPECULATIVE = ("frozen", "online", "online_compiled")


def read_log(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


def summarise(name: str, log: list[dict[str, float]], wall_s: float, tail: int, rows: int) -> dict[str, Any]:
    steps = [r for r in log if "step_time" in r]
    times = [r["step_time"] for r in steps]
    lengths = [r.get("completions/mean_length", 0.0) for r in steps]
    acc = [r["spec/accepted_per_pass"] for r in steps if "spec/accepted_per_pass" in r]
    line: dict[str, Any] = {
        "config": name, "steps": len(steps), "wall_s": round(wall_s, 1),
        "step_time_median": round(statistics.median(times), 3), "step_time_mean": round(statistics.mean(times), 3),
        "completion_length_mean": round(statistics.mean(lengths), 1),
        # `rows` completions a step (prompts_per_step x num_generations): rollout tokens per second of step time
        "tokens_per_step_s": round(statistics.mean(lengths) * rows / statistics.mean(times), 1),
        "reward_last10": round(statistics.mean(r.get("reward", 0.0) for r in steps[-10:]), 3),
    }
    # Where a step's time goes (medians): the rollout, the rewards, and the rest of TRL's step
    # (log-probs, loss, backward, optimiser; the drafter's training is its own column below).
    for part in ("rollout_s", "rewards_s"):
        if values := [r[f"time/{part}"] for r in steps if f"time/{part}" in r]:
            line[f"{part}_median"] = round(statistics.median(values), 3)
    if acc:  # rows are logged every 5 steps (each the mean of its steps): first / last `tail` steps
        last_step = max(r["step"] for r in steps)
        first = [r["spec/accepted_per_pass"] for r in steps if "spec/accepted_per_pass" in r and r["step"] <= tail]
        last = [r["spec/accepted_per_pass"] for r in steps
                if "spec/accepted_per_pass" in r and r["step"] > last_step - tail]
        line.update(acceptance_first10=round(statistics.mean(first or acc[:1]), 3),
                    acceptance_last10=round(statistics.mean(last or acc[-1:]), 3))
        # The median: the first logged row is step 1 alone, which carries the drafter's
        # initialisation (init_steps), and would weigh as much as a row of five steps in a mean.
        drafter = [r["drafter/seconds"] for r in steps if "drafter/seconds" in r]
        line["drafter_seconds_per_step"] = round(statistics.median(drafter), 3) if drafter else 0.0
        line["drafter_seconds_step1"] = round(drafter[0], 3) if drafter else 0.0
    return line


def plot(logs: dict[str, list[dict[str, float]]], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, log in logs.items():
        steps = [r for r in log if "step_time" in r]
        b.plot([r["step"] for r in steps], [r["step_time"] for r in steps], label=name, lw=1)
        acc = [(r["step"], r["spec/accepted_per_pass"]) for r in steps if "spec/accepted_per_pass" in r]
        if acc:
            a.plot(*zip(*acc), label=name, lw=1)
    a.set(title="drafts kept per row and verification pass", xlabel="GRPO step")
    # log scale: a compiled config's first steps (the compiling, a minute) would flatten the rest
    b.set(title="GRPO step time (s, log scale)", xlabel="GRPO step", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rft", default=str(ROOT / "data/rft/model"))
    ap.add_argument("--data", default=str(ROOT / "data/ingest/train.jsonl"))
    ap.add_argument("--rounds", type=int, default=1, help="run the configs round robin this many times; the "
                                                          "ratios are per round, then their median")
    ap.add_argument("--tail", type=int, default=10, help="steps averaged for the final acceptance")
    ap.add_argument("--plot", default=str(ROOT / "reports/plots/tlt_grpo.png"))
    ap.add_argument("--keep", help="a directory to keep each run's output in (default: a temporary one)")
    ap.add_argument("--spec", default="{}", help='JSON merged into frozen and online\'s speculative options, '
                                                 'e.g. \'{"train_steps": 30}\'')
    args = ap.parse_args()
    for name in SPECULATIVE:
        CONFIGS[name]["speculative"].update(json.loads(args.spec))
    names = [c for c in args.configs.split(",") if c]
    if unknown := set(names) - set(CONFIGS):
        ap.error(f"--configs: unknown {sorted(unknown)}; known: {list(CONFIGS)}")
    if not Path(args.rft).is_dir():
        ap.error(f"--rft {args.rft}: no such model directory (dvc repro --single-item rft makes it)")
    params = yaml.safe_load(Path(args.params).read_text())
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    logs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        base = Path(args.keep or tmp_dir)
        # Round robin (each round runs every config once): on a shared machine whose speed drifts
        # over minutes, a config timed alone in a slow stretch would look slower than it is.
        for r in range(args.rounds):
            for name in names:
                p = {**params, "grpo": {**params["grpo"], "max_steps": args.steps, **CONFIGS[name]}}
                work = base / (name if args.rounds == 1 else f"{name}.round{r}")
                work.mkdir(parents=True, exist_ok=True)
                (work / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
                env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "steps.grpo", "--params", str(work / "params.yaml"),
                                "--data", args.data, "--rft", args.rft, "--out", str(work / "out")],
                               cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
                log = read_log(work / "out" / "train_log.csv")
                logs.setdefault(name, log)  # the plot: the first round's
                rows = p["grpo"].get("prompts_per_step", 4) * p["grpo"].get("num_generations", 8)
                line = summarise(name, log, time.perf_counter() - t0, args.tail, rows)
                runs[name].append(line)
                print(json.dumps({**line, "round": r} if args.rounds > 1 else line), flush=True)
    plot(logs, Path(args.plot))
    last: dict[str, Any] = {"steps": args.steps, "rounds": args.rounds, "plot": args.plot}
    if "generate" in runs:
        g = runs["generate"]
        for name in CONFIGS:
            if name in runs and name != "generate":
                key = "step_speedup" if name == "online" else f"step_speedup_{name}"
                # per round, then the median over rounds (one round: the round's ratio)
                for figure, field, ours_over_base in ((key, "step_time_median", False),
                                                      (f"wall_speedup_{name}", "wall_s", False),
                                                      (f"tokens_per_step_s_ratio_{name}", "tokens_per_step_s", True)):
                    ratios = [(o[field] / b[field]) if ours_over_base else (b[field] / o[field])
                              for b, o in zip(g, runs[name])]
                    last[figure] = round(statistics.median(ratios), 2)
                    if args.rounds > 1:
                        last[f"{figure}_rounds"] = [round(x, 2) for x in ratios]
    for name in SPECULATIVE:
        acc = [line["acceptance_last10"] for line in runs.get(name, []) if "acceptance_last10" in line]
        if acc:
            last[f"acceptance_{name}"] = round(statistics.median(acc), 3)
    print(json.dumps(last))


if __name__ == "__main__":
    main()
