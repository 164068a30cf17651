"""judge: Correctness C and Helpfulness H per candidate; keep C=1 and H=1 (rejection sampling).

Input: ingest/train.jsonl and sample/candidates.jsonl. Output: judged.jsonl (every candidate
with its verdict and rationale), kept.jsonl (the RFT training set) and stats.json (keep rates
per dataset, and how many examples kept at least one candidate). The judge is chosen by name
(`kind`: rule now; an LLM judge through the same protocol).
"""
from __future__ import annotations

import argparse
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core.config import check_options, help_field, load_config
from steps.core.io import InputError, write_json, write_jsonl
from steps.core.judges import JUDGES, make_judge
from steps.core.schemas import CANDIDATES, EXAMPLES, JUDGED, read_validated, validate


@dataclass(frozen=True)
class JudgeConfig:
    kind: str = help_field("rule", "judge: rule | llm (steps.core.judges.JUDGES)")
    options: dict = field(default_factory=dict, metadata={
        "help": "passed to the judge (llm: model, base_url, api_key_env, votes, ...); checked against its constructor"})
    keep: str = help_field("correct_and_helpful", "filter: correct_and_helpful | correct | all (unfiltered SFT)")
    max_kept_per_example: int | None = help_field(None, "cap on kept candidates per example (None: all)", ge=1)

    def __post_init__(self) -> None:
        if self.kind not in JUDGES:
            raise ValueError(f"kind: unknown judge {self.kind!r}; known: {sorted(JUDGES)}")
        module, cls = JUDGES[self.kind].split(":")
        check_options(getattr(importlib.import_module(module), cls), self.options, "options")
        if self.keep not in ("correct_and_helpful", "correct", "all"):
            raise ValueError(f"keep must be correct_and_helpful, correct or all, got {self.keep!r}")


def judge(cfg: JudgeConfig, examples: list[dict[str, Any]], candidates: list[dict[str, Any]],
          judge_impl: Any = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """-> (judged rows, kept rows, stats)."""
    by_id = {e["id"]: e for e in examples}
    missing = sorted({c["id"] for c in candidates} - set(by_id))
    if missing:
        raise InputError(f"candidates refer to example ids not in the training set: {missing[:5]}")
    impl = judge_impl or make_judge(cfg.kind, **cfg.options)
    verdicts = impl.judge([by_id[c["id"]] for c in candidates], [c["response"] for c in candidates])
    judged, kept, per_example = [], [], {}
    for c, v in zip(candidates, verdicts, strict=True):
        keep = {"correct_and_helpful": v.correct and v.helpful, "correct": v.correct, "all": True}[cfg.keep]
        if keep and cfg.max_kept_per_example is not None:
            keep = per_example.get(c["id"], 0) < cfg.max_kept_per_example
        row = {**c, "correct": int(v.correct), "helpful": int(v.helpful), "rationale": v.rationale, "keep": bool(keep)}
        judged.append(row)
        if keep:
            kept.append(row)
            per_example[c["id"]] = per_example.get(c["id"], 0) + 1
    st: dict[str, Any] = {"judge": cfg.kind, "filter": cfg.keep}
    for ds in sorted({r["dataset"] for r in judged}):
        part = [r for r in judged if r["dataset"] == ds]
        ids = {r["id"] for r in part}
        st[ds] = {"candidates": len(part),
                  "correct_rate": sum(r["correct"] for r in part) / len(part),
                  "helpful_rate": sum(r["helpful"] for r in part) / len(part),
                  "keep_rate": sum(r["keep"] for r in part) / len(part),
                  "examples_with_a_kept_candidate": sum(1 for i in ids if per_example.get(i)) / len(ids),
                  "mean_kept_tokens": (sum(r["completion_tokens"] for r in part if r["keep"])
                                       / max(1, sum(r["keep"] for r in part)))}
    backend = getattr(impl, "backend", None)  # an LLM judge's servers: fail-over at a glance, as sample's
    if hasattr(getattr(backend, "stats", None), "summary"):
        st["backend"] = backend.stats.summary()
    return judged, kept, st


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--candidates", default="data/sample/candidates.jsonl")
    ap.add_argument("--out", default="data/judge")
    args = ap.parse_args(argv)
    cfg = load_config(JudgeConfig, "judge", args.params)
    examples = read_validated(args.data, EXAMPLES)
    candidates = read_validated(args.candidates, CANDIDATES)
    judged, kept, st = judge(cfg, examples, candidates)
    out = Path(args.out)
    validate(judged, JUDGED, out / "judged.jsonl")
    write_jsonl(out / "judged.jsonl", judged)
    write_jsonl(out / "kept.jsonl", kept)
    write_json(out / "stats.json", st)
    from steps.core import tracking
    datasets = {ds: d for ds, d in st.items() if isinstance(d, dict) and "keep_rate" in d}
    metrics = {f"{ds}_{k}": v for ds, d in datasets.items() for k, v in d.items()}
    if "backend" in st:
        metrics["backend_requests_moved"] = st["backend"]["requests_moved"]
        metrics["backend_servers_went_down"] = len(st["backend"]["servers_went_down"])
    tracking.log_stage("judge", cfg, metrics=metrics)
    for ds, d in datasets.items():
        print(f"judge: {ds}: keep rate {d['keep_rate']:.1%} (C {d['correct_rate']:.1%}, H {d['helpful_rate']:.1%})")


if __name__ == "__main__":
    main()
