"""methods: every registered method on the same data, in one table and one Pareto plot.

Input: the registry (params.yaml `models`: each trained row is a method with its seeds) and the
run copies that flows/compare.py makes in reports/compare/runs/<run>/ (one run per seed; a run
at seed s trains every method at seed s). Output: reports/methods.json and methods.md (per
method and dataset: correctness, helpfulness, EM, F1, tokens and decode TFLOPs per response, and
each protocol's own columns such as inserted tokens, calls or cost, as mean, std, min and max
over seeds; the fixed rows — teacher, student base — once; and per hop count where the data has
them, the think ratio and correctness), reports/plots/methods_pareto.png
(correctness against tokens per response, error bars over seeds, the Pareto front marked) and,
when an RL log has them, reports/plots/methods_calls.png: calls per response over training (the
logs' `rollout/calls`, `rollout/calls_<member>` and `rollout/call_ratio` columns, steps/core/rl.py,
and the reward beside them), one panel per policy and column, a line per seed: where a method
learns to call, or stops; reports/plots/methods_thinking.png: the think ratio over training
(AdaCoT's `rollout/thinks`, AdaptThink's 1 - `rollout/p_nothinking`, per hop count), and,
when rows report a cost (the routed rows: each pool member alone, the random router, Router-R1 at
each alpha), reports/plots/methods_cost.png: correctness (EM on musique) against cost per query,
error bars over seeds, the Pareto front (cheaper, and at least as often right) marked.

    python -m steps.methods --runs reports/compare/runs --out reports
"""
from __future__ import annotations

import argparse
from pathlib import Path
from collections.abc import Callable
from typing import Any

from steps import ablations as A
from steps.core.io import write_json, write_text


def variants(rows: dict[str, Any]) -> list[A.Variant]:
    """One variant per trained row: the method, at each of its seeds, with the params as they are."""
    return [A.Variant(name, name, {}, tuple(r.seeds)) for name, r in rows.items() if not r.fixed]


def write_report(rows: dict[str, Any], runs_dir: Path, out: Path) -> dict[str, Any]:
    runs = [A.read_run(d) for d in sorted(runs_dir.iterdir()) if (d / "run.json").exists()] if runs_dir.exists() else []
    report = A.build_report(variants(rows), runs, A.references(rows))
    write_json(out / "methods.json", report)
    md = A.markdown(report).replace("# Ablations", "# Methods", 1).replace(
        "the seeds of rft and grpo (`seeds`)", "each method's seeds (params.yaml `models.<name>.seeds`)", 1)
    write_text(out / "methods.md", md + hops_markdown(report))
    A.plot_pareto(report, out / "plots" / "methods_pareto.png")
    plot_calls(runs_dir, out / "plots" / "methods_calls.png")
    plot_thinking(runs_dir, out / "plots" / "methods_thinking.png")
    plot_cost(report, out / "plots" / "methods_cost.png")
    return report


def hop_counts(report: dict[str, Any], dataset: str) -> list[str]:
    rows = {**report["references"], **report["variants"]}
    return sorted({k.split("/")[0].removeprefix("hops_") for r in rows.values()
                   for k in r["datasets"].get(dataset, {}) if k.startswith("hops_")}, key=int)


def hops_markdown(report: dict[str, Any]) -> str:
    """Per dataset with hop counts (musique): each row's think ratio (the share of responses with
    a non-empty thinking) and correctness per hop count — where a hybrid-thinking method should
    think on hard questions only. Empty when no dataset has hop counts."""
    def cell(s: dict[str, Any] | None) -> str:
        if not s or s["mean"] is None:
            return "–"
        return f"{100 * s['mean']:.0f}" + (f" ± {100 * s['std']:.0f}" if s["std"] is not None else "")

    lines = []
    for ds in report["datasets"]:
        hops = hop_counts(report, ds)
        if not hops:
            continue
        head = " | ".join(f"think % {h}-hop" for h in hops) + " | " + " | ".join(f"correct % {h}-hop" for h in hops)
        lines += [f"## {ds} by hop count", "",
                  "Think ratio: the share of responses with a non-empty thinking. Mean ± std over seeds.", "",
                  f"| variant | think % | {head} |", "|---|" + "---|" * (1 + 2 * len(hops))]
        for name, r in [*report["references"].items(), *report["variants"].items()]:
            m = r["datasets"].get(ds, {})
            cells = [cell(m.get("think_ratio"))] + [cell(m.get(f"hops_{h}/think_ratio")) for h in hops] + \
                    [cell(m.get(f"hops_{h}/correctness")) for h in hops]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


COST = "extras/cost"


def cost_points(report: dict[str, Any], dataset: str) -> dict[str, tuple[float, float, float, float]]:
    """{row: (cost mean, correctness % mean, cost std, correctness % std)} for every row with a
    cost on `dataset` (fixed rows first); std 0 where a row has one seed. Correctness, not EM: a
    judged dataset (e-commerce) has no EM."""
    rows = {**report["references"], **report["variants"]}
    out = {}
    for name, r in rows.items():
        m = r["datasets"].get(dataset, {})
        if COST in m and m[COST]["mean"] is not None and m["correctness"]["mean"] is not None:
            out[name] = (m[COST]["mean"], 100 * m["correctness"]["mean"], m[COST].get("std") or 0.0,
                         100 * (m["correctness"].get("std") or 0.0))
    return out


def plot_cost(report: dict[str, Any], path: Path) -> bool:
    """methods_cost.png (module docstring); False, and no file, when no row reports a cost."""
    panels = {ds: cost_points(report, ds) for ds in report["datasets"]}
    panels = {ds: pts for ds, pts in panels.items() if pts}
    if not panels:
        path.unlink(missing_ok=True)
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (ds, pts) in zip(axes[0], panels.items()):
        for name, (x, y, dx, dy) in pts.items():
            ax.errorbar(x, y, xerr=dx, yerr=dy, fmt="s" if name in report["references"] else "o", capsize=3, zorder=2)
        front = A.pareto_front({n: (x, y) for n, (x, y, _, _) in pts.items()})
        A.pareto_panel(ax, [(x, y, name) for name, (x, y, _, _) in pts.items()], [pts[n][:2] for n in front],
                       "Pareto front", "cost per query (member tokens x price per million / 1e6)",
                       f"{ds}: mean over seeds, bars = std (squares: fixed rows)")
    fig.tight_layout()
    A._save(fig, path)
    return True


def is_call_column(column: str) -> bool:
    # calls_<member>, not the counter of searches beyond the limit
    return (column in ("rollout/calls", "rollout/call_ratio")
            or (column.startswith("rollout/calls_") and column != "rollout/calls_over_limit"))


def is_think_column(column: str) -> bool:
    # AdaCoT's own decisions (rollout/thinks); AdaptThink's policy p(NoThinking), overall and per hop
    return column == "rollout/thinks" or column.startswith("rollout/p_nothinking")


def log_curves(runs_dir: Path, keep: Callable[[str], bool]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """{"<policy>: <column>": {run: [(step, value), ...]}} for the columns `keep` takes from the run
    copies' <policy>_train_log.csv, and beside them the policy's reward (what it was paid)."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for run in sorted(d for d in runs_dir.iterdir() if d.is_dir()) if runs_dir.exists() else []:
        for log in sorted(run.glob("*_train_log.csv")):
            rows = A.read_log(log)
            policy = log.name.removesuffix("_train_log.csv")
            cols = sorted({k for r in rows for k in r if keep(k)})
            for col in cols + (["reward"] if cols and any("reward" in r for r in rows) else []):
                curves.setdefault(f"{policy}: {col.removeprefix('rollout/')}", {})[run.name] = [
                    (r["step"], r[col]) for r in rows if col in r]
    return curves


def call_curves(runs_dir: Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    return log_curves(runs_dir, is_call_column)


def think_curves(runs_dir: Path) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """The think ratio over training: AdaCoT's `thinks` as logged; AdaptThink's as 1 - p_nothinking
    (its rollouts are forced half and half, so the policy's own choice is that probability)."""
    out = {}
    for panel, by_run in log_curves(runs_dir, is_think_column).items():
        policy, col = panel.split(": ", 1)
        if col.startswith("p_nothinking"):
            hop = col.removeprefix("p_nothinking").removeprefix("_hops_")
            out[f"{policy}: think ratio" + (f", {hop}-hop" if hop else "")] = {
                run: [(x, 1.0 - y) for x, y in pts] for run, pts in by_run.items()}
            if not hop:  # a ratio near 1 hides how far from choosing NoThinking the policy is
                out[f"{policy}: p(NoThinking) (log)"] = by_run
        else:
            out[f"{policy}: think ratio" if col == "thinks" else panel] = by_run
    return out


def plot_log_curves(curves: dict[str, dict[str, list[tuple[float, float]]]], path: Path, title: str) -> bool:
    """One panel per policy and column, a line per run; False, and no file, when there is none."""
    if not curves:
        path.unlink(missing_ok=True)  # an earlier report's plot would describe other runs
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = 4
    nrows = -(-len(curves) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3 * nrows), squeeze=False)
    for ax, (panel, by_run) in zip(axes.flat, curves.items()):
        for run, pts in by_run.items():
            ax.plot(*zip(*pts), marker=".", label=run)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step")
        if panel.endswith("(log)"):
            ax.set_yscale("log")
        elif not panel.endswith(": reward"):  # a reward can be negative (a format penalty)
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    A._save(fig, path)
    return True


def plot_calls(runs_dir: Path, path: Path) -> bool:
    """methods_calls.png (module docstring); False, and no file, when no log has a call column."""
    return plot_log_curves(call_curves(runs_dir), path,
                           "calls per response over training, and the reward (rollout statistics of the RL logs)")


def plot_thinking(runs_dir: Path, path: Path) -> bool:
    """methods_thinking.png (module docstring); False, and no file, when no log has a think column."""
    return plot_log_curves(think_curves(runs_dir), path,
                           "think ratio over training (AdaCoT: its rollouts; AdaptThink: 1 - the policy's "
                           "p(NoThinking)), and the reward")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from steps.core import tracking
    from steps.core.registry import load_registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--runs", default="reports/compare/runs")
    ap.add_argument("--out", default="reports")
    args = ap.parse_args(argv)
    out = Path(args.out)
    report = write_report(load_registry(args.params), Path(args.runs), out)
    metrics = {f"{n}/{ds}/{f}": s["mean"] for n, r in report["variants"].items()
               for ds, m in r["datasets"].items() for f, s in m.items() if s["mean"] is not None}
    tracking.log_stage("methods", {"runs": args.runs}, metrics=metrics,
                       artifacts=[out / "methods.json", out / "methods.md", out / "plots" / "methods_pareto.png",
                                  *[p for p in [out / "plots" / "methods_calls.png", out / "plots" / "methods_cost.png",
                                              out / "plots" / "methods_thinking.png"]
                                    if p.exists()]])
    print((out / "methods.md").read_text())
    return report


if __name__ == "__main__":
    main()
