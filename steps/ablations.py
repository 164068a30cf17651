"""ablations: the report over the ablation runs that flows/ablations.py makes.

Input: ablations.yaml (variant -> overrides, the evaluated model row that is the variant, seeds)
and the run copies in reports/ablations/runs/<run>/ (run.json, summary.json, train_log.csv).
A variant's run for seed s is the pipeline with its overrides plus, when s is not base.seed,
rft.seed = grpo.seed = s; variants with the same overrides and seed share one run (the default
run gives both the RFT-only and the RFT+GRPO rows).

Output: reports/ablations.json and ablations.md (per variant and dataset: correctness,
helpfulness, EM, F1, tokens and decode TFLOPs per response as mean, std, min and max over
seeds; the teacher and the student base from the default run), reports/plots/ablations_pareto.png
(correctness versus tokens per response, with the Pareto front of the variants) and
reports/plots/grpo_curves.png (GRPO curves of the default run and of the runs that differ from
it in grpo settings only).

    python -m steps.ablations --variants ablations.yaml --runs reports/ablations/runs --out reports
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from steps.core.io import InputError, atomic_path, read_json, write_json, write_text

METRICS = ("correctness", "helpfulness", "em", "f1", "tokens_per_response", "decode_tflops_per_response")
NULLABLE = ("em", "f1")  # e-commerce has no short gold answer
# Reported too when a summary row has them: inserted tokens, each protocol's own numbers, the
# think ratio, and per hop count (`hops_<h>/<metric>`, from the summary's `by_hops`) these two.
OPTIONAL_PREFIXES = ("external_tokens_per_response", "extras/", "think_ratio")
BY_HOPS = ("correctness", "think_ratio")


def references(rows: dict[str, Any]) -> tuple[str, ...]:
    """The registry's fixed rows (teacher, student base): the same in every run, reported once."""
    return tuple(n for n, r in rows.items() if r.fixed)


def seed_keys(rows: dict[str, Any]) -> tuple[str, ...]:
    """`<stage>.seed` of every trained row's stage: a run at seed s sets them all."""
    return tuple(sorted({f"{r.stage}.seed" for r in rows.values() if not r.fixed}))


@dataclass(frozen=True)
class Variant:
    name: str
    model: str
    overrides: dict[str, Any]
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class Run:
    name: str                  # experiment name and folder of the run's copy
    seed: int
    overrides: dict[str, Any]  # the variant's
    settings: dict[str, Any]   # what `dvc exp run -S` sets: the overrides plus the seed keys
    rows: tuple[str, ...] = ()  # registry rows it evaluates (empty: all of them, through `report`)


def _lookup(params: dict[str, Any], dotted: str) -> bool:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def load_variants(path: Path | str, params: dict[str, Any] | None = None, rows: dict[str, Any] | None = None,
                  ) -> list[Variant]:
    """Parse ablations.yaml; with `params`, every override must name an existing key (a typo
    would otherwise fail deep inside `dvc exp run`, after the runs before it). A variant's
    `model` is a row of the model registry (`rows`, default: params.yaml's)."""
    from steps.core.registry import load_registry

    path = Path(path)
    rows = rows if rows is not None else load_registry(params=params) if params is not None else load_registry()
    trained = [n for n, r in rows.items() if not r.fixed]
    keys = seed_keys(rows)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict) or not data["variants"]:
        raise InputError(f"{path}: expected a non-empty mapping under 'variants'")
    out = []
    for name, spec in data["variants"].items():
        where = f"{path}: variant '{name}'"
        if not isinstance(spec, dict):
            raise InputError(f"{where}: expected a mapping")
        unknown = sorted(set(spec) - {"model", "overrides", "seeds"})
        if unknown:
            raise InputError(f"{where}: unknown key(s) {unknown}; allowed: model, overrides, seeds")
        if spec.get("model") not in trained:
            raise InputError(f"{where}: field 'model' must be a trained row of the model registry {trained}, "
                             f"got {spec.get('model')!r}")
        overrides = spec.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise InputError(f"{where}: field 'overrides' must be a mapping of params key -> value")
        for key, value in overrides.items():
            if key in keys:
                raise InputError(f"{where}: override '{key}' is set by 'seeds'")
            if isinstance(value, (dict, list)):
                raise InputError(f"{where}: override '{key}' must be a single value, got {value!r}")
            if params is not None and not _lookup(params, key):
                raise InputError(f"{where}: override '{key}' is not a key of params.yaml")
        seeds = spec.get("seeds", [0])
        if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
            raise InputError(f"{where}: field 'seeds' must be a non-empty list of distinct integers, got {seeds!r}")
        out.append(Variant(str(name), spec["model"], dict(overrides), tuple(seeds)))
    return out


def plan_runs(variants: list[Variant], base_seed: int, keys: tuple[str, ...],
              rows: dict[str, Any] | None = None) -> list[Run]:
    """One run per distinct (overrides, seed), named after the first variant that needs it
    (`default` when there are no overrides); in variant order, seeds innermost. A seed other
    than `base_seed` sets every key of `keys` (the trained stages' seeds).

    With the registry (`rows`), a run evaluates only what its variants need: the main job's rows,
    each variant's row and the rows it is compared to, in registry order. Without it a run makes
    every row, the sibling methods included."""
    runs: dict[str, Run] = {}
    needed: dict[str, set[str]] = {}
    for v in variants:
        for seed in v.seeds:
            key = _run_key(v.overrides, seed)
            if key not in runs:
                settings = dict(v.overrides)
                if seed != base_seed:
                    settings.update({k: seed for k in keys})
                runs[key] = Run(f"{v.name if v.overrides else 'default'}-s{seed}", seed, dict(v.overrides), settings)
                needed[key] = set()
            needed[key] |= _with_references(v.model, rows or {})
    if rows is None:
        return list(runs.values())
    main = {n for n, r in rows.items() if r.main}
    return [replace(r, rows=tuple(n for n in rows if n in main | needed[k])) for k, r in runs.items()]


def _with_references(name: str, rows: dict[str, Any]) -> set[str]:
    """`name` and the chain of rows it is compared to (compare_to of compare_to ...)."""
    out: set[str] = set()
    while name in rows and name not in out:
        out.add(name)
        name = rows[name].compare_to
    return out


def _run_key(overrides: dict[str, Any], seed: int) -> str:
    return json.dumps([sorted(overrides.items()), seed])


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_run(directory: Path) -> dict[str, Any]:
    """A run copy: run.json (name, seed, overrides, settings), summary.json, and the GRPO log
    rows when the copy has one."""
    meta = read_json(directory / "run.json")
    for key in ("name", "seed", "overrides", "settings"):
        if key not in meta:
            raise InputError(f"{directory / 'run.json'}: missing field '{key}'")
    summary = read_json(directory / "summary.json")
    if not isinstance(summary.get("datasets"), dict) or not summary["datasets"]:
        raise InputError(f"{directory / 'summary.json'}: missing field 'datasets'")
    log = directory / "train_log.csv"
    return {**meta, "summary": summary, "summary_path": directory / "summary.json",
            "log": read_log(log) if log.exists() else None}


def read_log(path: Path) -> list[dict[str, float]]:
    """train_log.csv rows as floats; a column a logging step did not write is left out."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "step" not in (reader.fieldnames or []):
            raise InputError(f"{path}: missing column 'step'")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            try:
                rows.append({k: float(v) for k, v in row.items() if v not in ("", None)})
            except ValueError as e:
                raise InputError(f"{path}: line {lineno}: {e}") from None
    return rows


def model_row(run: dict[str, Any], dataset: str, model: str) -> dict[str, float | None]:
    """One model's metrics on one dataset, checked: the error names file, row and field."""
    path = run["summary_path"]
    if dataset not in run["summary"]["datasets"]:
        raise InputError(f"{path}: datasets: no '{dataset}' (the other runs have it)")
    rows = run["summary"]["datasets"][dataset]
    if model not in rows:
        raise InputError(f"{path}: datasets.{dataset}: no '{model}' row")
    out = {k: v for k, v in rows[model].items() if k.startswith(OPTIONAL_PREFIXES) and _number(v)}
    for hops, part in (rows[model].get("by_hops") or {}).items():
        out.update({f"hops_{hops}/{k}": part[k] for k in BY_HOPS if _number(part.get(k))})
    for field in METRICS:
        if field not in rows[model]:
            raise InputError(f"{path}: datasets.{dataset}.{model}: missing field '{field}'")
        value = rows[model][field]
        if not (_number(value) or (value is None and field in NULLABLE)):
            raise InputError(f"{path}: datasets.{dataset}.{model}.{field}: expected a number, got {value!r}")
        out[field] = value
    return out


def spread(values: list[float | None]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for one seed), min and max of the non-null values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals)}


def aggregate(runs: list[dict[str, Any]], model: str, datasets: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for ds in datasets:
        rows = [model_row(r, ds, model) for r in runs]
        fields = list(METRICS) + sorted({k for row in rows for k in row} - set(METRICS))
        out[ds] = {f: spread([row.get(f) for row in rows]) for f in fields}
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the (tokens, correctness) points that no other point beats on both (fewer or
    equal tokens and higher or equal correctness, one strictly), in order of tokens."""
    front, best = [], float("-inf")
    for name, (_, acc) in sorted(points.items(), key=lambda kv: (kv[1][0], -kv[1][1])):
        if acc > best:
            front.append(name)
            best = acc
    return front


def build_report(variants: list[Variant], runs: list[dict[str, Any]], refs: tuple[str, ...]) -> dict[str, Any]:
    by_key = {_run_key(r["overrides"], r["seed"]): r for r in runs}
    default = next((r for r in runs if not r["settings"]), None)
    reference_run = default or (runs[0] if runs else None)
    if reference_run is None:
        raise InputError("no run copies to report on (run flows/ablations.py first)")
    datasets = sorted(reference_run["summary"]["datasets"], key=lambda d: (d != "musique", d))
    report: dict[str, Any] = {
        "note": ("mean over n_seeds runs that differ in rft.seed = grpo.seed; std is the sample standard "
                 "deviation (null for one seed); teacher and student_base come from one run"),
        "datasets": datasets, "references": {}, "variants": {}, "missing": {}, "pareto_front": {}}
    for name in refs:
        if name in reference_run["summary"]["datasets"][datasets[0]]:
            report["references"][name] = {"model": name, "overrides": {}, "seeds": [reference_run["seed"]],
                                          "n_seeds": 1, "runs": [reference_run["name"]],
                                          "datasets": aggregate([reference_run], name, datasets)}
    for v in variants:
        found = [by_key[k] for k in (_run_key(v.overrides, s) for s in v.seeds) if k in by_key]
        missing = [s for s in v.seeds if _run_key(v.overrides, s) not in by_key]
        if missing:
            report["missing"][v.name] = missing
        if found:
            report["variants"][v.name] = {"model": v.model, "overrides": v.overrides,
                                          "seeds": [r["seed"] for r in found], "n_seeds": len(found),
                                          "runs": [r["name"] for r in found],
                                          "datasets": aggregate(found, v.model, datasets)}
    for ds in datasets:
        points = {n: (row["datasets"][ds]["tokens_per_response"]["mean"], row["datasets"][ds]["correctness"]["mean"])
                  for n, row in report["variants"].items()}
        report["pareto_front"][ds] = pareto_front(points)
    return report


def markdown(report: dict[str, Any]) -> str:
    def cell(s: dict[str, Any], scale: float, spec: str = ".1f") -> str:
        if s["mean"] is None:
            return "–"
        text = f"{scale * s['mean']:{spec}}"
        return text + (f" ± {scale * s['std']:{spec}}" if s["std"] is not None else "")

    def overrides(o: dict[str, Any]) -> str:
        return ", ".join(f"`{k}={v}`" for k, v in o.items()) or "defaults"

    lines = ["# Ablations", "",
             "Mean ± sample standard deviation over the seeds of rft and grpo (`seeds`); the teacher and the "
             "student base are the default run's. `row` is the evaluated model that is the variant.", ""]
    for ds in report["datasets"]:
        lines += [f"## {ds}", "", "| variant | row | seeds | correct % | helpful % | EM % | F1 % | tokens/response "
                  "| decode GFLOPs/response | on Pareto front | overrides |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [*report["references"].items(), *report["variants"].items()]
        for name, r in rows:
            m = r["datasets"][ds]
            front = "yes" if name in report["pareto_front"][ds] else ("" if name in report["references"] else "no")
            setting = f"{r['runs'][0]}'s" if name in report["references"] else overrides(r["overrides"])
            lines.append(f"| {name} | {r['model']} | {r['n_seeds']} | {cell(m['correctness'], 100)} | "
                         f"{cell(m['helpfulness'], 100)} | {cell(m['em'], 100)} | {cell(m['f1'], 100)} | "
                         f"{cell(m['tokens_per_response'], 1)} | {cell(m['decode_tflops_per_response'], 1e3, '.3g')} | "
                         f"{front} | {setting} |")
        lines.append("")
    if report["missing"]:
        lines += ["Not run yet (variant: seeds): " + "; ".join(f"{n}: {s}" for n, s in report["missing"].items()), ""]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def plot_pareto(report: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = report["datasets"]
    fig, axes = plt.subplots(1, len(datasets), figsize=(6.5 * len(datasets), 5), squeeze=False)
    marks = {"teacher": ("*", 260, "black"), "student_base": ("s", 90, "grey")}
    # Any further fixed row (the methods report's route_teacher, route_student_base, ...) gets the
    # next of these, the same one in every panel.
    spare = iter([("D", 70, "dimgrey"), ("P", 90, "darkgrey"), ("X", 90, "silver"), ("v", 80, "lightgrey")])
    for ax, ds in zip(axes[0], datasets):
        for name, r in report["references"].items():
            m = r["datasets"][ds]
            marker, size, color = marks.get(name) or marks.setdefault(name, next(spare, ("x", 70, "grey")))
            ax.scatter(m["tokens_per_response"]["mean"], 100 * m["correctness"]["mean"], marker=marker, s=size,
                       color=color, label=name, zorder=3)
        labels: dict[tuple[float, float], list[str]] = {}
        for name, r in report["variants"].items():
            m = r["datasets"][ds]
            x, y = m["tokens_per_response"]["mean"], 100 * m["correctness"]["mean"]
            ax.errorbar(x, y, xerr=m["tokens_per_response"]["std"] or 0, yerr=100 * (m["correctness"]["std"] or 0),
                        fmt="o", capsize=3, zorder=2)
            labels.setdefault((round(x, 1), round(y, 1)), []).append(name)
        # Variants on the same spot share one label.
        front = [report["variants"][n]["datasets"][ds] for n in report["pareto_front"][ds]]
        pareto_panel(ax, [(x, y, ", ".join(names)) for (x, y), names in labels.items()],
                     [(m["tokens_per_response"]["mean"], 100 * m["correctness"]["mean"]) for m in front],
                     "Pareto front (variants)", "tokens per response (thinking included)",
                     f"{ds}: mean over seeds, bars = std")
    fig.tight_layout()
    _save(fig, path)


def pareto_panel(ax: Any, labels: list[tuple[float, float, str]], front: list[tuple[float, float]],
                 front_label: str, xlabel: str, title: str) -> None:
    """The finish every Pareto panel shares: labels that adjustText moves off each other and off
    the points (neighbours often sit close), with a leader line; the front as a dashed line;
    correctness on y; grid and legend."""
    from adjustText import adjust_text

    texts = [ax.text(x, y, label, fontsize=8) for x, y, label in labels]
    if texts:
        adjust_text(texts, x=[x for x, _, _ in labels], y=[y for _, y, _ in labels], ax=ax, expand=(1.2, 1.4),
                    arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
    ax.plot([x for x, _ in front], [y for _, y in front], "--", color="tab:red", alpha=0.6, label=front_label,
            zorder=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("correctness %")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")


def curve_runs(variants: list[Variant], runs: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """GRPO logs to overlay, by variant in file order: the default run and the runs that change
    grpo settings only (λ, β, the starting policy), first seed each."""
    by_key = {_run_key(r["overrides"], r["seed"]): r for r in runs}
    out: dict[str, list[dict[str, float]]] = {}
    seen = set()
    for v in variants:
        r = by_key.get(_run_key(v.overrides, v.seeds[0]))
        if (v.model == "rft_grpo" and r and r["log"] and r["name"] not in seen
                and all(k.startswith("grpo.") for k in r["settings"])):
            seen.add(r["name"])
            out[v.name] = r["log"]
    return out


def plot_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    columns = {k for rows in curves.values() for row in rows for k in row}
    panels = (["reward"] + sorted(c for c in columns if c.startswith("rewards/") and c.endswith("/mean"))
              + ["completions/mean_length", "kl"])
    ncols = 3
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    # One colour per run across all panels: the colour cycle restarts per panel, and KL is logged
    # only by runs with beta > 0, so cycling would give one run two colours.
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {label: cycle[i % len(cycle)] for i, label in enumerate(curves)}
    for ax, panel in zip(axes.flat, panels):
        for label, rows in curves.items():
            pts = [(r["step"], r[panel]) for r in rows if panel in r]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=label, color=colors[label])
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged\n(KL needs grpo.beta > 0)" if panel == "kl" else "not logged",
                    ha="center", va="center", transform=ax.transAxes)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    spare = list(axes.flat)[len(panels):]
    for ax in spare:
        ax.axis("off")
    handles = [Line2D([], [], color=c, marker=".", label=label) for label, c in colors.items()]
    (spare[0] if spare else axes.flat[0]).legend(handles=handles, loc="center", fontsize=9, title="run (variant)")
    fig.tight_layout()
    _save(fig, path)


def write_report(variants: list[Variant], runs_dir: Path, out: Path, refs: tuple[str, ...]) -> dict[str, Any]:
    """Read every run copy under `runs_dir`, write the JSON, the markdown and both plots."""
    runs = [read_run(d) for d in sorted(runs_dir.iterdir()) if (d / "run.json").exists()] if runs_dir.exists() else []
    report = build_report(variants, runs, refs)
    write_json(out / "ablations.json", report)
    write_text(out / "ablations.md", markdown(report))
    plot_pareto(report, out / "plots" / "ablations_pareto.png")
    curves = curve_runs(variants, runs)
    if curves:
        plot_curves(curves, out / "plots" / "grpo_curves.png")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from steps.core import tracking

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="ablations.yaml")
    ap.add_argument("--runs", default="reports/ablations/runs")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    out = Path(args.out)
    from steps.core.registry import load_registry

    rows = load_registry()
    report = write_report(load_variants(args.variants, rows=rows), Path(args.runs), out, references(rows))
    metrics = {f"{n}/{ds}/{f}": s["mean"] for n, r in report["variants"].items()
               for ds, m in r["datasets"].items() for f, s in m.items() if s["mean"] is not None}
    tracking.log_stage("ablations", {"variants": args.variants, "runs": args.runs}, metrics=metrics,
                       artifacts=[out / "ablations.json", out / "ablations.md", out / "plots" / "ablations_pareto.png",
                                  out / "plots" / "grpo_curves.png"])
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
