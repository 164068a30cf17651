"""GRPO's course on the dev split: the grpo stage with a checkpoint every N steps, each evaluated.

    .venv/bin/python -m bench.grpo_curve --every 20       # needs data/rft/model (dvc repro rft)

Runs the grpo stage (`python -m steps.grpo`, params.yaml's grpo section with `save_steps` set to
--every) from --rft into a work directory, then the evaluate stage on --data (the dev split:
tuning reads dev, never eval) for the starting policy (step 0), every checkpoint and the final
model, and for the registry rows in --levels (the teacher) as flat lines to compare with. Prints
one JSON line per model and step (correctness, helpfulness, tokens per response, per dataset),
writes them to --out/curve.jsonl, and plots correctness, helpfulness and tokens per response
against the step (--plot). What it answers: whether an earlier checkpoint would have been the
better model (where correctness peaks while the answers shorten), and how many steps the run needs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIGURES = ("correctness", "helpfulness", "tokens_per_response")


def run(module: str, *args: str, env: dict[str, str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{module} {' '.join(args)} failed (exit {proc.returncode}); its output: {log}")


def evaluate(params: dict[str, Any], row: str, path: str, data: str, out: Path, env: dict[str, str]) -> dict[str, Any]:
    """The evaluate stage on `data` for registry row `row` with its weights at `path`; per
    dataset figures (steps.report.summarise). Kept between runs: an evaluated directory is read back."""
    from steps.core.io import read_jsonl
    from steps.report import summarise

    if not (out / "predictions.jsonl").exists():
        p = {**params, "models": {**params["models"], row: {**params["models"][row], "path": path}}}
        out.parent.mkdir(parents=True, exist_ok=True)
        (out.parent / f"{out.name}.params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        run("steps.evaluate", "--params", str(out.parent / f"{out.name}.params.yaml"), "--model", row,
            "--data", data, "--out", str(out), env=env, log=out.parent / f"{out.name}.log")
    figures = summarise({row: list(read_jsonl(out / "predictions.jsonl"))}, {})["datasets"]
    return {ds: {k: by_model[row][k] for k in FIGURES} for ds, by_model in figures.items()}


def plot(points: list[dict[str, Any]], levels: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(points[0]["figures"])
    fig, axes = plt.subplots(len(FIGURES), len(datasets), figsize=(5 * len(datasets), 3 * len(FIGURES)),
                             squeeze=False, sharex=True)
    steps = [p["step"] for p in points]
    for j, ds in enumerate(datasets):
        for i, fig_name in enumerate(FIGURES):
            ax = axes[i][j]
            ax.plot(steps, [p["figures"][ds][fig_name] for p in points], marker="o", label="GRPO (step 0: RFT)")
            for name, figs in levels.items():
                ax.axhline(figs[ds][fig_name], ls="--", color="grey", lw=1)
                ax.annotate(name, (steps[-1], figs[ds][fig_name]), fontsize=8, color="grey", va="bottom", ha="right")
            ax.set(title=f"{ds}: {fig_name}", xlabel="GRPO step" if i == len(FIGURES) - 1 else None)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, out)


def save_figure(fig: Any, out: Path) -> None:
    """Lay out `fig`, write it to `out` atomically (steps.core.io.atomic_path: an interrupted run
    leaves the previous plot, not half a file) and close it."""
    import matplotlib.pyplot as plt

    from steps.core.io import atomic_path

    fig.tight_layout()
    with atomic_path(out, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--every", type=int, default=20, help="a checkpoint every this many GRPO steps")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rft", default=str(ROOT / "data/rft/model"))
    ap.add_argument("--train", default=str(ROOT / "data/ingest/train.jsonl"))
    ap.add_argument("--data", default=str(ROOT / "data/ingest/dev.jsonl"), help="the split evaluated (dev)")
    ap.add_argument("--levels", default="teacher", help="registry rows drawn as flat lines (comma-separated)")
    ap.add_argument("--out", default=str(ROOT / "data/grpo_curve"), help="work directory (kept: reruns resume)")
    ap.add_argument("--plot", default=str(ROOT / "reports/plots/grpo_dev_curve.png"))
    args = ap.parse_args()
    if args.every < 1:
        ap.error("--every: at least 1")
    if not Path(args.rft).is_dir():
        ap.error(f"--rft {args.rft}: no such model directory (dvc repro --single-item rft makes it)")
    params = yaml.safe_load(Path(args.params).read_text())
    unknown = [r for r in args.levels.split(",") if r and r not in params["models"]]
    if unknown:
        ap.error(f"--levels: {unknown} are not rows of {args.params} models")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")}
    grpo = out / "grpo"
    if not (grpo / "model").is_dir():
        p = {**params, "grpo": {**params["grpo"], "save_steps": args.every}}
        (out / "grpo.params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
        print(f"grpo_curve: training, a checkpoint every {args.every} steps -> {grpo}", file=sys.stderr, flush=True)
        run("steps.grpo", "--params", str(out / "grpo.params.yaml"), "--data", args.train, "--rft", args.rft,
            "--out", str(grpo), env=env, log=out / "grpo.log")
    checkpoints = sorted(grpo.glob("checkpoints/checkpoint-*"), key=lambda d: int(d.name.split("-")[1]))
    max_steps = json.loads((grpo / "metrics.json").read_text()).get("steps", params["grpo"].get("max_steps"))
    models = [(0, args.rft)] + [(int(d.name.split("-")[1]), str(d)) for d in checkpoints]
    if models[-1][0] != max_steps:
        models.append((max_steps, str(grpo / "model")))
    points = []
    with (out / "curve.jsonl").open("w") as f:
        for step, path in models:
            print(f"grpo_curve: evaluating step {step} on {Path(args.data).name}", file=sys.stderr, flush=True)
            figures = evaluate(params, "rft_grpo", path, args.data, out / "eval" / f"step_{step}", env)
            points.append({"step": step, "figures": figures})
            f.write(json.dumps(points[-1]) + "\n")
            print(json.dumps(points[-1]), flush=True)
    levels = {row: evaluate(params, row, params["models"][row]["path"], args.data, out / "eval" / row, env)
              for row in args.levels.split(",") if row}
    for row, figures in levels.items():
        print(json.dumps({"level": row, "figures": figures}), flush=True)
    plot(points, levels, Path(args.plot))


if __name__ == "__main__":
    main()
