"""report: every evaluated model row in one summary, the claims checked, the plots.

Input: data/evaluate/<name>/{predictions.jsonl, stats.json} for every row of params.yaml
`models` (the evaluate@<name> stages). Output: reports/summary.json and summary.md (per dataset
and model: correctness, helpfulness, EM, F1, tokens, external tokens, decode and prefill TFLOPs,
latency, n, and the mean of every protocol-specific number in `extras`), reports/metrics.json
(DVC metrics), reports/plots/tokens_vs_correctness.png and models.jsonl (DVC plots). Rows appear
in registry order; the claims are params (`report.claims`), each a comparison between two rows.
"""
from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steps.core.config import ConfigError, build, help_field, load_config
from steps.core.io import InputError, atomic_path, read_json, write_json, write_jsonl, write_text
from steps.core.schemas import PREDICTIONS, read_validated

HEADLINE = ("correctness", "helpfulness", "em", "f1", "tokens_per_response", "decode_tflops_per_response")


@dataclass(frozen=True)
class Claim:
    model: str = help_field(help="the row the claim is about")
    metric: str = help_field(help="a summary field, e.g. correctness, tokens_per_response")
    vs: str = help_field(help="the row it is compared with")
    kind: Literal["diff", "ratio"] = help_field("diff", "diff: model - vs; ratio: model / vs")
    op: Literal[">=", "<="] = help_field(">=", "how the measured value must relate to target")
    target: float = help_field(0.0, "the bound")
    dataset: str | None = help_field(None, "the eval set it is checked on (null: report.claims_dataset)")

    @property
    def text(self) -> str:
        if self.kind == "ratio":
            return f"{self.model} {self.metric} {self.op} {self.target:g} x {self.vs}"
        return f"{self.model} {self.metric} {self.op} {self.vs} {self.target:+g}"


@dataclass(frozen=True)
class ReportConfig:
    claims_dataset: str = help_field("musique", "the dataset a claim is checked on unless it names one")
    claims: tuple[dict, ...] = field(default=(), metadata={"help": "list of Claim mappings"})

    def parsed_claims(self, where: str = "report") -> list[Claim]:
        return [build(Claim, c, f"{where}.claims[{i}]") for i, c in enumerate(self.claims)]


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def think_ratio(rows: list[dict[str, Any]]) -> float | None:
    """The share of responses with a non-empty thinking (hybrid thinking's measure)."""
    from steps.core.prompts import split_completion

    return statistics.fmean(bool(split_completion(r["completion"])[0].strip()) for r in rows) if rows else None


def by_hops(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The headline figures per hop count (only where a dataset has more than one)."""
    hops = sorted({r["hops"] for r in rows})
    if len(hops) < 2:
        return {}
    out = {}
    for h in hops:
        part = [r for r in rows if r["hops"] == h]
        out[str(h)] = {"correctness": _mean(part, "correct"), "helpfulness": _mean(part, "helpful"),
                       "em": _mean(part, "em"), "tokens_per_response": _mean(part, "completion_tokens"),
                       "think_ratio": think_ratio(part), "n": len(part)}
    return out


def summarise(preds: dict[str, list[dict[str, Any]]], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{datasets: {dataset: {model: figures}}}, models in the order of `preds`; each model's
    figures hold `by_hops` (figures per hop count) where the dataset mixes hop counts."""
    out: dict[str, Any] = {"datasets": {}}
    datasets = sorted({p["dataset"] for rows in preds.values() for p in rows})
    for ds in datasets:
        out["datasets"][ds] = {}
        for model, rows in preds.items():
            rows = [p for p in rows if p["dataset"] == ds]
            if not rows:
                continue
            extras = sorted({k for r in rows for k in r.get("extras", {})})
            out["datasets"][ds][model] = {
                "correctness": _mean(rows, "correct"), "helpfulness": _mean(rows, "helpful"),
                "em": _mean(rows, "em"), "f1": _mean(rows, "f1"),
                "tokens_per_response": _mean(rows, "completion_tokens"),
                "external_tokens_per_response": _mean(rows, "external_tokens"),
                "decode_tflops_per_response": _mean(rows, "decode_tflops"),
                "prefill_tflops_per_response": _mean(rows, "prefill_tflops"),
                "latency_s_per_response_batched": _mean(rows, "latency_s"),
                "latency_s_single_request": (stats.get(model, {}).get("latency_s_single_request") or {}).get(ds),
                "think_ratio": think_ratio(rows),
                "n": len(rows),
                **{f"extras/{k}": statistics.fmean(r["extras"].get(k, 0.0) for r in rows) for k in extras},
                "by_hops": by_hops(rows)}
    return out


def check_claims(summary: dict[str, Any], claims: list[Claim], dataset: str) -> list[dict[str, Any]]:
    rows = summary["datasets"].get(dataset, {})
    out = []
    for c in claims:
        a, b = rows.get(c.model, {}).get(c.metric), rows.get(c.vs, {}).get(c.metric)
        if a is None or b is None:
            out.append({"claim": c.text, "value": None, "target": c.target, "holds": None})
            continue
        value = a - b if c.kind == "diff" else a / max(b, 1e-30)
        holds = value >= c.target if c.op == ">=" else value <= c.target
        out.append({"claim": c.text, "value": round(value, 4), "target": c.target, "holds": bool(holds)})
    return out


def check_all(summary: dict[str, Any], claims: list[Claim], default_dataset: str) -> dict[str, list[dict[str, Any]]]:
    """{dataset: checked claims}: each claim on its own dataset, or on `default_dataset`."""
    by_dataset: dict[str, list[Claim]] = {}
    for c in claims:
        by_dataset.setdefault(c.dataset or default_dataset, []).append(c)
    return {ds: check_claims(summary, cs, ds) for ds, cs in by_dataset.items()}


def markdown(summary: dict[str, Any]) -> str:
    def fmt(v: Any, pct: bool = False, digits: int = 1) -> str:
        if v is None:
            return "–"
        return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = []
    for ds, models in summary["datasets"].items():
        extras = sorted({k for s in models.values() for k in s if k.startswith("extras/")})
        lines += [f"### {ds}", "",
                  "| model | correct % | helpful % | EM % | F1 % | tokens/response | decode GFLOPs/response "
                  "| latency ms (1 req) | n |" + "".join(f" {k[7:]} |" for k in extras),
                  "|---|---|---|---|---|---|---|---|---|" + "---|" * len(extras)]
        for m, s in models.items():
            lat = None if s["latency_s_single_request"] is None else 1000 * s["latency_s_single_request"]
            lines.append(f"| {m} | {fmt(s['correctness'], True)} | {fmt(s['helpfulness'], True)} | {fmt(s['em'], True)} | "
                         f"{fmt(s['f1'], True)} | {fmt(s['tokens_per_response'])} | "
                         f"{fmt(s['decode_tflops_per_response'] * 1e3, digits=3)} | {fmt(lat)} | {s['n']} |"
                         + "".join(f" {fmt(s.get(k), digits=3)} |" for k in extras))
        lines.append("")
        hop_rows = [(m, h, f) for m, s in models.items() for h, f in s.get("by_hops", {}).items()]
        if hop_rows:
            lines += [f"#### {ds} by hop count", "",
                      "| model | hops | correct % | helpful % | EM % | tokens/response | think % | n |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {m} | {h} | {fmt(f['correctness'], True)} | {fmt(f['helpfulness'], True)} | "
                      f"{fmt(f['em'], True)} | {fmt(f['tokens_per_response'])} | {fmt(f['think_ratio'], True)} | "
                      f"{f['n']} |" for m, h, f in hop_rows]
            lines.append("")
    for ds, checks in (summary.get("claims") or {}).items():
        if checks:
            lines += [f"### Claims on the {ds} eval set", "", "| claim | measured | target | holds |", "|---|---|---|---|"]
            lines += [f"| {c['claim']} | {'–' if c['value'] is None else format(c['value'], '+.3f')} | "
                      f"{c['target']:+.3f} | {'–' if c['holds'] is None else 'yes' if c['holds'] else 'no'} |"
                      for c in checks]
            lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, Any], out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(summary["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for m, s in summary["datasets"][ds].items():
            ax.scatter(s["tokens_per_response"], 100 * s["correctness"], s=60)
            ax.annotate(m, (s["tokens_per_response"], 100 * s["correctness"]), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("tokens per response (thinking included)")
        ax.set_ylabel("correctness %")
        ax.set_title(ds)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def gather(evaluations: Path, rows: dict[str, Any]) -> tuple[dict[str, list], dict[str, dict], list[str]]:
    """Predictions and stats of every row evaluated under `evaluations`, and the rows that are not.
    A main-job row must be there; a sibling method's row (main: false) is left out when the run
    did not make it (`make run` makes the main job only; `dvc repro` and `make compare` make all)."""
    preds, stats, missing = {}, {}, []
    for name, row in rows.items():
        d = evaluations / name
        if not (d / "predictions.jsonl").exists():
            if row.main:
                raise InputError(f"{d / 'predictions.jsonl'}: file not found (run `dvc repro evaluate@{name}`)")
            missing.append(name)
            continue
        preds[name] = read_validated(d / "predictions.jsonl", PREDICTIONS)
        stats[name] = read_json(d / "stats.json")
    return preds, stats, missing


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from steps.core import tracking
    from steps.core.registry import load_registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--evaluations", default="data/evaluate")
    ap.add_argument("--out", default="reports")
    ap.add_argument("--rows", nargs="+", metavar="NAME",
                    help="report only these rows of the registry (an experiment that evaluated only them)")
    args = ap.parse_args(argv)
    cfg = load_config(ReportConfig, "report", args.params)
    claims = cfg.parsed_claims(f"{args.params}: section 'report'")
    rows = load_registry(args.params)
    for c in claims:
        for name in (c.model, c.vs):
            if name not in rows:
                raise ConfigError(f"{args.params}: section 'report': claim {c.text!r} names {name!r}, "
                                  f"which is not a row of `models` ({list(rows)})")
    if args.rows:
        unknown = sorted(set(args.rows) - set(rows))
        if unknown:
            raise ConfigError(f"--rows: {unknown} are not rows of `models` in {args.params} ({list(rows)})")
        rows = {n: r for n, r in rows.items() if n in args.rows}
        claims = [c for c in claims if c.model in rows and c.vs in rows]
    preds, stats, missing = gather(Path(args.evaluations), rows)
    summary = summarise(preds, stats)
    summary["not_evaluated"] = missing
    summary["claims"] = check_all(summary, claims, cfg.claims_dataset)
    summary["models"] = {n: {"stage": r.stage, "protocol": r.protocol, "compare_to": r.compare_to,
                             "model_digest": stats[n].get("model_digest")} for n, r in rows.items() if n in stats}
    out = Path(args.out)
    write_json(out / "summary.json", summary)
    md = markdown(summary) + (f"Not evaluated in this run (`dvc repro` or `make compare` makes them): "
                              f"{', '.join(missing)}\n" if missing else "")
    write_text(out / "summary.md", md)
    flat = {f"{ds}.{m}.{k}": v for ds, ms in summary["datasets"].items() for m, s in ms.items() for k, v in s.items()
            if v is not None and k in HEADLINE}
    write_json(out / "metrics.json", flat)
    write_jsonl(out / "plots" / "models.jsonl",
                [{"dataset": ds, "model": m, "tokens_per_response": s["tokens_per_response"],
                  "correctness": s["correctness"]} for ds, ms in summary["datasets"].items() for m, s in ms.items()])
    plot(summary, out / "plots" / "tokens_vs_correctness.png")
    tracking.log_stage("report", cfg, metrics={k.replace(".", "/"): v for k, v in flat.items()},
                       artifacts=[out / "summary.md", out / "plots" / "tokens_vs_correctness.png"])
    print(md)
    return summary


if __name__ == "__main__":
    main()
