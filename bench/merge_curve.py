"""The correctness-length frontier between RFT and GRPO, traced by weight interpolation.

    .venv/bin/python -m bench.merge_curve --pair data/rft/model:data/grpo/model --alphas 0.3,0.5,0.7,0.85

For each `--pair RFT:GRPO` (one per seed: the GRPO model trained from that RFT model) and each
alpha, writes the model with weights (1 - alpha) * RFT + alpha * GRPO (every floating tensor;
config, tokenizer and the rest are the GRPO model's) and runs the evaluate stage on --data (the dev
split: tuning reads dev, never eval). alpha 0 is RFT itself and alpha 1 the GRPO model, both
evaluated as they are. Prints one JSON line per pair and alpha (correctness, helpfulness, tokens
per response, per dataset), writes them to --out/curve.jsonl, and plots correctness against tokens
per response as a fraction of RFT's (--plot), one line per seed and their mean, with the
issue's 0.45 x length bar.

What it answers: whether GRPO buys correctness at a given length, or only moves the policy along the
line from the long RFT answers to short ones. A GRPO point above the interpolated curve at its
length is correctness that RL added; at or under it, the shortening is what the run bought. Weight
interpolation between a fine-tuned model and its start is a common way to pick a point between them
(WiSE-FT, and the long-to-short merging of reasoning models); here it is a measuring stick, not a stage.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.grpo_curve import evaluate, save_figure  # noqa: E402
from steps.core.io import write_jsonl  # noqa: E402

WEIGHTS = "model.safetensors"


def interpolate(start: dict[str, Any], end: dict[str, Any], alpha: float) -> dict[str, Any]:
    """(1 - alpha) * start + alpha * end for every floating tensor, computed in float32 and cast back
    to `end`'s dtype; other tensors (integer buffers) are `end`'s. The two must hold the same names
    and shapes: models of different architectures do not interpolate."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: between 0 (the start model) and 1 (the end model)")
    if start.keys() != end.keys():
        only = sorted(start.keys() ^ end.keys())
        raise ValueError(f"the two models hold different tensors ({len(only)} differ, e.g. {only[:3]}): "
                         "not one architecture")
    out = {}
    for name, b in end.items():
        a = start[name]
        if a.shape != b.shape:
            raise ValueError(f"{name}: shape {tuple(a.shape)} against {tuple(b.shape)}: not one architecture")
        out[name] = ((1.0 - alpha) * a.float() + alpha * b.float()).to(b.dtype) if b.is_floating_point() else b
    return out


def write_merged(start: Path, end: Path, alpha: float, out: Path) -> Path:
    """The interpolated model as a model directory: `end`'s files with the merged weights. Written to
    a temporary directory and renamed, so an interrupted run leaves no half model behind."""
    from safetensors.torch import load_file, save_file

    for d in (start, end):
        if not (d / WEIGHTS).exists():
            raise FileNotFoundError(f"{d}: no {WEIGHTS} (a model directory the rft or grpo stage wrote)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(end, tmp, ignore=shutil.ignore_patterns(WEIGHTS, "checkpoints"))
    merged = interpolate(load_file(start / WEIGHTS), load_file(end / WEIGHTS), alpha)
    save_file(merged, tmp / WEIGHTS, metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def relative_tokens(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each point's tokens per response as a fraction of its own pair's alpha-0 (RFT) point, per dataset."""
    base = {(p["pair"], ds): f["tokens_per_response"] for p in points if p["alpha"] == 0.0
            for ds, f in p["figures"].items()}
    return [{**p, "tokens_vs_rft": {ds: f["tokens_per_response"] / base[(p["pair"], ds)]
                                    for ds, f in p["figures"].items()}} for p in points]


def plot(points: list[dict[str, Any]], out: Path, bar: float = 0.45) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted(points[0]["figures"])
    pairs = sorted({p["pair"] for p in points})
    alphas = sorted({p["alpha"] for p in points})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for pair in pairs:
            run = sorted((p for p in points if p["pair"] == pair), key=lambda p: p["alpha"])
            ax.plot([p["tokens_vs_rft"][ds] for p in run], [p["figures"][ds]["correctness"] * 100 for p in run],
                    marker=".", lw=0.8, alpha=0.5, label=f"seed {pair}")
        mean = [(statistics.fmean(p["tokens_vs_rft"][ds] for p in points if p["alpha"] == a),
                 statistics.fmean(p["figures"][ds]["correctness"] * 100 for p in points if p["alpha"] == a))
                for a in alphas]
        ax.plot(*zip(*mean), marker="o", color="black", label="mean")
        for a, (x, y) in zip(alphas, mean):
            ax.annotate(f"{a:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(bar, ls="--", color="grey", lw=1)
        ax.axhline(mean[0][1], ls=":", color="grey", lw=1)
        ax.set(title=f"{ds}: alpha from RFT (0) to GRPO (1)", xlabel="tokens per response ÷ RFT's",
               ylabel="correct %")
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", action="append", required=True,
                    help="RFT_MODEL:GRPO_MODEL, the GRPO model trained from that RFT model; once per seed")
    ap.add_argument("--alphas", default="0.3,0.5,0.7,0.85", help="interpolation weights of the GRPO model "
                                                                  "(0 and 1, the two models, are always evaluated)")
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--data", default=str(ROOT / "data/ingest/dev.jsonl"), help="the split evaluated (dev)")
    ap.add_argument("--out", default=str(ROOT / "data/merge_curve"), help="work directory (kept: reruns resume)")
    ap.add_argument("--plot", default=str(ROOT / "reports/plots/merge_curve.png"))
    args = ap.parse_args()
    try:
        alphas = sorted({0.0, 1.0} | {float(a) for a in args.alphas.split(",") if a})
    except ValueError:
        ap.error(f"--alphas {args.alphas!r}: comma-separated numbers between 0 and 1")
    if not all(0.0 <= a <= 1.0 for a in alphas):
        ap.error(f"--alphas {args.alphas!r}: each between 0 and 1")
    pairs = []
    for spec in args.pair:
        start, sep, end = spec.partition(":")
        if not sep or not Path(start).is_dir() or not Path(end).is_dir():
            ap.error(f"--pair {spec!r}: two model directories, RFT_MODEL:GRPO_MODEL")
        pairs.append((Path(start), Path(end)))
    params = yaml.safe_load(Path(args.params).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")}
    points = []
    for i, (start, end) in enumerate(pairs):
        for alpha in alphas:
            path = start if alpha == 0.0 else end if alpha == 1.0 else None
            if path is None:
                path = out / f"pair{i}" / f"alpha_{alpha:g}"
                if not (path / WEIGHTS).exists():
                    write_merged(start, end, alpha, path)
            print(f"merge_curve: pair {i}, alpha {alpha:g}: evaluating on {Path(args.data).name}",
                  file=sys.stderr, flush=True)
            figures = evaluate(params, "rft_grpo", str(path), args.data, out / f"pair{i}" / f"eval_{alpha:g}", env)
            points.append({"pair": i, "alpha": alpha, "model": str(path), "figures": figures})
    points = relative_tokens(points)
    write_jsonl(out / "curve.jsonl", points)
    for p in points:
        print(json.dumps(p), flush=True)
    plot(points, Path(args.plot))


if __name__ == "__main__":
    main()
