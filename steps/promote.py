"""promote: move the registry's `champion` alias to the newly exported version when it is no worse.

Input: data/export/registry.json ({model_name, version, run_id, source}, written by export).
The candidate's evaluation metrics are its export run's metrics (`<dataset>/<metric>`, e.g.
`musique/correctness`); the champion's are those of the version holding the `champion` alias.
Each gate in params (`correctness: {better: higher, tolerance: 0.01}`) is checked per
dataset. When every gate passes, `champion` moves to the candidate and the old champion keeps
the `previous` alias; either way the decision and its reasons are written as model-version
tags (`promotion.*`) and to data/promote/decision.json.

    python -m steps.promote             # decide (the DVC stage)
    python -m steps.promote rollback    # champion back to `previous`

With no champion yet, the first version becomes champion. A candidate that already holds the
alias is left alone, so re-running the stage changes nothing. Rollback follows the chain the
promotions recorded (`promotion.previous_version`), so it can step back more than once.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from steps.core.config import help_field, load_config
from steps.core.io import InputError, read_json, write_json

DEFAULT_GATES = {"correctness": {"better": "higher", "tolerance": 0.01},
                 "tokens_per_response": {"better": "lower", "tolerance": 0.0}}
# Float metrics that went through JSON and MLflow may differ in the last bits.
_EPS = 1e-9


@dataclass(frozen=True)
class PromoteConfig:
    alias: str = help_field("champion", "the alias that serving loads (models:/<name>@champion)")
    previous_alias: str = help_field("previous", "the alias the replaced champion keeps (rollback target)")
    datasets: tuple[str, ...] = help_field((), "datasets to gate; empty: every dataset either version has "
                                               "a gated metric for")
    gates: dict = field(default_factory=lambda: dict(DEFAULT_GATES),
                        metadata={"help": "metric -> {better: higher|lower, tolerance}: the candidate may be "
                                          "worse than the champion by at most `tolerance` (absolute)"})

    def __post_init__(self) -> None:
        if self.alias == self.previous_alias:
            raise ValueError(f"alias and previous_alias are both {self.alias!r}; give them different names")
        if not self.gates:
            raise ValueError("gates is empty: promotion needs at least one metric to compare")
        for name, gate in self.gates.items():
            if not isinstance(gate, dict) or set(gate) - {"better", "tolerance"}:
                raise ValueError(f"gates.{name}: expected {{better: higher|lower, tolerance: number}}, got {gate!r}")
            if gate.get("better") not in ("higher", "lower"):
                raise ValueError(f"gates.{name}.better: expected 'higher' or 'lower', got {gate.get('better')!r}")
            tol = gate.get("tolerance", 0.0)
            if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0 or tol == float("inf"):
                raise ValueError(f"gates.{name}.tolerance: expected a number >= 0, got {tol!r}")


@dataclass(frozen=True)
class Check:
    dataset: str
    metric: str
    candidate: float | None
    champion: float | None
    better: str
    tolerance: float
    passed: bool
    reason: str


def split_metrics(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    """{"musique/correctness": 0.8} -> {"musique": {"correctness": 0.8}} (other keys are ignored)."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        ds, sep, name = key.partition("/")
        if sep and name:
            out.setdefault(ds, {})[name] = float(value)
    return out


def compare(cfg: PromoteConfig, candidate: dict[str, float], champion: dict[str, float]) -> list[Check]:
    """Every gate on every dataset. Inputs are flat run metrics (`<dataset>/<metric>`)."""
    cand, champ = split_metrics(candidate), split_metrics(champion)
    datasets = list(cfg.datasets) or sorted(
        ds for ds in set(cand) | set(champ) if set(cfg.gates) & (set(cand.get(ds, {})) | set(champ.get(ds, {}))))
    checks = []
    for ds in datasets:
        for metric, gate in cfg.gates.items():
            c, p = cand.get(ds, {}).get(metric), champ.get(ds, {}).get(metric)
            better, tol = gate["better"], float(gate.get("tolerance", 0.0))
            key = f"{ds}/{metric}"
            if c is None:
                passed, reason = False, f"{key}: the candidate has no such metric"
            elif p is None:
                # A dataset the champion was never evaluated on cannot show a regression.
                passed, reason = True, f"{key}: the champion has no such metric; nothing to compare"
            elif better == "higher":
                passed = c >= p - tol - _EPS
                reason = f"{key}: {c:.4g} {'>=' if passed else '<'} champion {p:.4g} - tolerance {tol:g}"
            else:
                passed = c <= p + tol + _EPS
                reason = f"{key}: {c:.4g} {'<=' if passed else '>'} champion {p:.4g} + tolerance {tol:g}"
            checks.append(Check(ds, metric, c, p, better, tol, passed, reason))
    return checks


def decide(cfg: PromoteConfig, candidate: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any]:
    """The decision for `candidate` ({version, metrics}) against the current `champion` (same
    shape, or None). Returns {action, reasons, checks, aliases (alias -> version to set),
    tags (version -> tags to write)}; applying it is the caller's job."""
    cv = int(candidate["version"])
    if champion is None:
        return {"action": "promoted", "checks": [],
                "reasons": [f"no version holds {cfg.alias!r}: the first candidate becomes {cfg.alias}"],
                "aliases": {cfg.alias: cv},
                "tags": {cv: {"promotion.decision": "promoted", "promotion.compared_to": "none"}}}
    pv = int(champion["version"])
    if pv == cv:
        return {"action": "unchanged", "checks": [], "aliases": {}, "tags": {},
                "reasons": [f"version {cv} already holds {cfg.alias!r}"]}
    checks = compare(cfg, candidate.get("metrics") or {}, champion.get("metrics") or {})
    failed = [c.reason for c in checks if not c.passed]
    if not checks:
        failed = [f"no gated metric ({sorted(cfg.gates)}) on any dataset of either version"]
    tags: dict[int, dict[str, str]] = {cv: {"promotion.compared_to": str(pv)}}
    if failed:
        tags[cv]["promotion.decision"] = "refused"
        return {"action": "refused", "checks": [asdict(c) for c in checks], "reasons": failed,
                "aliases": {}, "tags": tags}
    tags[cv].update({"promotion.decision": "promoted", "promotion.previous_version": str(pv)})
    tags[pv] = {"promotion.superseded_by": str(cv)}
    return {"action": "promoted", "checks": [asdict(c) for c in checks], "reasons": [c.reason for c in checks],
            "aliases": {cfg.alias: cv, cfg.previous_alias: pv}, "tags": tags}


def rollback_plan(cfg: PromoteConfig, champion: int | None, previous: int | None,
                  previous_tags: dict[str, str]) -> dict[str, Any]:
    """Champion back to `previous`; `previous` steps one further back along the chain the
    promotions recorded (or goes away at the start of the chain)."""
    if champion is None:
        raise InputError(f"rollback: no version holds {cfg.alias!r}; nothing to roll back")
    if previous is None:
        raise InputError(f"rollback: no version holds {cfg.previous_alias!r}; version {champion} "
                         f"stays {cfg.alias}")
    before = previous_tags.get("promotion.previous_version")
    return {"action": "rolled_back", "reasons": [f"{cfg.alias} {champion} -> {previous} on request"],
            "aliases": {cfg.alias: previous, cfg.previous_alias: int(before) if before else None},
            "tags": {champion: {"promotion.decision": "rolled_back"},
                     previous: {"promotion.restored_from": str(champion)}}}


def apply(model_name: str, plan: dict[str, Any], stamp: str) -> None:
    """Write the plan's tags (with the reasons and a timestamp) and move its aliases."""
    from steps.core import tracking

    for version, tags in plan["tags"].items():
        tracking.tag_model_version(model_name, version, {
            **tags, "promotion.reasons": "; ".join(plan["reasons"]), "promotion.decided_at": stamp})
    tracking.set_aliases(model_name, plan["aliases"])


def main(argv: list[str] | None = None) -> None:
    from steps.core import tracking

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", nargs="?", default="decide", choices=("decide", "rollback"))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--registry", default="data/export/registry.json")
    ap.add_argument("--model-name", help="rollback: the registered model (default: registry.json's)")
    ap.add_argument("--out", default="data/promote")
    args = ap.parse_args(argv)
    cfg = load_config(PromoteConfig, "promote", args.params)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # Rollback needs only the model name, which --model-name can give without a registry.json.
    registry = read_json(args.registry) if args.command == "decide" or Path(args.registry).exists() else {}
    name = args.model_name or registry.get("model_name")
    if not name:
        raise InputError(f"{args.registry}: no model_name (pass --model-name)")

    if args.command == "rollback":
        if not tracking.enabled():
            raise InputError("rollback: PIPELINE_TRACKING is off; there is no registry to change")
        champ, prev = tracking.alias_version(name, cfg.alias), tracking.alias_version(name, cfg.previous_alias)
        prev_tags = tracking.model_version(name, prev)["tags"] if prev is not None else {}
        plan = rollback_plan(cfg, champ, prev, prev_tags)
        apply(name, plan, stamp)
        print(json.dumps({"model_name": name, "action": plan["action"], "aliases": plan["aliases"],
                          "reasons": plan["reasons"], "decided_at": stamp}))
        return

    version = registry.get("version")
    live = version is not None and tracking.enabled()
    if not live:
        plan = {"action": "skipped", "checks": [], "aliases": {}, "tags": {},
                "reasons": [f"{args.registry}: export registered no model version" if version is None
                            else "PIPELINE_TRACKING is off: no registry to promote in"]}
        champ_before = None
    else:
        candidate = tracking.model_version(name, int(version))
        champ_before = tracking.alias_version(name, cfg.alias)
        champion = tracking.model_version(name, champ_before) if champ_before is not None else None
        plan = decide(cfg, candidate, champion)
        apply(name, plan, stamp)
    after = {a: tracking.alias_version(name, a) if live else None for a in (cfg.alias, cfg.previous_alias)}
    decision = {"model_name": name, "candidate_version": version, "champion_before": champ_before,
                "action": plan["action"], "reasons": plan["reasons"], "checks": plan["checks"],
                "champion_after": after[cfg.alias], "previous_after": after[cfg.previous_alias],
                "decided_at": stamp}
    write_json(Path(args.out) / "decision.json", decision)
    print(f"promote: {name} v{version}: {plan['action']} ({'; '.join(plan['reasons'])})")


if __name__ == "__main__":
    main()
