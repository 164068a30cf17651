"""ingest: read the sources named in params and write deterministic train/eval splits.

Sources: `synthetic` (the embedded default: a MuSiQue-format multi-hop set and an ePQA-shaped
e-commerce set, generated here and written to raw/ in their official formats), `musique`
(official MuSiQue JSONL) and `ecommerce` (JSONL with documents, dialogue history, question and
optional reference answers; the ePQA sample loads as is). All sources pass through the same
loaders, so the synthetic set exercises exactly the path real files take.

Outputs (examples schema): train.jsonl, eval.jsonl, plus stats.json. The split is a hash of
the example id, so adding rows never moves an existing row between splits. A malformed input
line stops the stage with the file, the line and the field named; nothing is written then.
So does a named source that yields no example (an empty file, or only unanswerable records),
and an id that occurs twice (both occurrences named, file and line). stats.json has an entry
per source (`sources`): records read, examples kept, unanswerable records skipped, and MuSiQue
records whose answer (or any alias) appears in no paragraph, which are kept, counted and warned
about (the official data has a few; many point at a broken export).
"""
from __future__ import annotations

import argparse
import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core import synth
from steps.core.config import help_field, load_config
from steps.core.io import InputError, iter_jsonl, write_json, write_jsonl
from steps.core.metrics import normalize_answer
from steps.core.schemas import EXAMPLES, validate

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "musique", "ecommerce")
_HOPS_RE = re.compile(r"^(\d)hop")


@dataclass(frozen=True)
class IngestConfig:
    sources: tuple[str, ...] = help_field(("synthetic",), "any of synthetic, musique, ecommerce")
    musique_path: str | None = help_field(None, "official MuSiQue JSONL (source musique)")
    ecommerce_path: str | None = help_field(None, "e-commerce JSONL in the ePQA shape (source ecommerce)")
    synthetic_musique_n: int = help_field(2400, "synthetic multi-hop examples to generate", ge=1)
    synthetic_hop_mix: dict = help_field(None, "share of synthetic MuSiQue questions per hop count (1-4), e.g. "
                                               "{1: 0.25, 2: 0.35, 3: 0.25, 4: 0.15}; null: 2-hop only")
    synthetic_ecommerce_n: int = help_field(1200, "synthetic e-commerce examples to generate", ge=1)
    eval_fraction: float = help_field(0.1, "share of each dataset held out for evaluation", gt=0.0, lt=1.0)
    max_eval_per_dataset: int = help_field(200, "cap on eval examples per dataset (the rest go to train)", ge=1)
    dev_fraction: float = help_field(0.1, "share of each dataset held out for tuning (dev.jsonl): defaults and "
                                          "sweeps are chosen on dev, claims are reported on eval", ge=0.0, lt=1.0)
    max_dev_per_dataset: int = help_field(200, "cap on dev examples per dataset (the rest go to train)", ge=0)
    max_train_per_dataset: int | None = help_field(None, "cap on train examples per dataset", ge=1)
    seed: int = help_field(0, "from base.seed", ge=0)

    def __post_init__(self) -> None:
        bad = [s for s in self.sources if s not in SOURCES]
        if bad or not self.sources:
            raise ValueError(f"sources {list(self.sources)}: each must be one of {list(SOURCES)}")
        for src, path in (("musique", self.musique_path), ("ecommerce", self.ecommerce_path)):
            if src in self.sources and not path:
                raise ValueError(f"source {src} needs {src}_path")
        if not 0.0 < self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.eval_fraction}")
        mix = self.synthetic_hop_mix or {}
        if any(not isinstance(h, int) or not 1 <= h <= 4 or not isinstance(w, (int, float)) or w < 0
               for h, w in mix.items()) or (mix and sum(mix.values()) <= 0):
            raise ValueError(f"synthetic_hop_mix must map hop counts 1-4 to non-negative shares, got {mix}")
        if self.eval_fraction + self.dev_fraction >= 1.0:
            raise ValueError(f"eval_fraction + dev_fraction must be < 1, got {self.eval_fraction} + {self.dev_fraction}")


class _Row:
    """Typed field access that names file, line and field in every error."""

    def __init__(self, path: str, lineno: int, obj: dict[str, Any], prefix: str = ""):
        self.path, self.lineno, self.obj, self.prefix = path, lineno, obj, prefix

    def fail(self, field: str, expected: str, got: Any) -> InputError:
        return InputError(f"{self.path}: line {self.lineno}: field '{self.prefix}{field}': "
                          f"expected {expected}, got {got!r}"[:400])

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if field not in self.obj or self.obj[field] is None:
            if default is not ...:
                return default
            raise self.fail(field, _name(kind), "nothing (missing)")
        v = self.obj[field]
        if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
            raise self.fail(field, _name(kind), v)
        # A required text (an id, a question) must say something; "" would pass the type check
        # and fail only later, in the output's schema, far from the line that holds it.
        textual = kind is str or (isinstance(kind, tuple) and str in kind)
        if isinstance(v, str) and textual and not v.strip() and default is ...:
            raise self.fail(field, "a non-empty string", v)
        return v

    def items(self, field: str, default: Any = ...) -> list["_Row"]:
        values = self.get(field, list, default)
        out = []
        for i, v in enumerate(values):
            if not isinstance(v, dict):
                raise self.fail(f"{field}[{i}]", "an object", v)
            out.append(_Row(self.path, self.lineno, v, f"{self.prefix}{field}[{i}]."))
        return out

    def strings(self, field: str, default: Any = ...) -> list[str]:
        values = self.get(field, list, default)
        for i, v in enumerate(values):
            if not isinstance(v, str):
                raise self.fail(f"{field}[{i}]", "a string", v)
        return values


def _name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "true/false"}
    return names.get(kind, str(kind)) if isinstance(kind, type) else " or ".join(names.get(k, str(k)) for k in kind)


def _document(title: str, text: str) -> str:
    text = " ".join(text.split())
    return text if not title or text.lower().startswith(title.lower()) else f"{title} : {text}"


@dataclass
class SourceReport:
    """What one source gave: where each example came from (for duplicate-id messages), and the
    counts that go to stats.json."""
    path: str
    dataset: str = ""
    records: int = 0
    skipped_unanswerable: int = 0
    answer_not_in_paragraphs: int = 0
    origins: list[tuple[str, int]] = field(default_factory=list)  # (file, line) per example, in order

    def stats(self) -> dict[str, Any]:
        return {"path": self.path, "records": self.records, "examples": len(self.origins),
                "skipped_unanswerable": self.skipped_unanswerable,
                "answer_not_in_paragraphs": self.answer_not_in_paragraphs}


def _answer_in(answers: list[str], docs: list[str]) -> bool:
    """Whether any answer occurs, as whole words after the official normalisation, in a document."""
    texts = [f" {normalize_answer(d)} " for d in docs]
    norms = [normalize_answer(a) for a in answers]
    return any(n and f" {n} " in t for n in norms for t in texts)


def parse_musique(rows: list[tuple[int, dict[str, Any]]], path: str,
                  report: SourceReport | None = None) -> tuple[list[dict[str, Any]], int]:
    """Official MuSiQue records -> examples. Unanswerable records are skipped and counted;
    `report` (optional) collects origins and counts."""
    out, skipped = [], 0
    report = report if report is not None else SourceReport(path)
    for lineno, obj in rows:
        report.records += 1
        r = _Row(path, lineno, obj)
        if r.get("answerable", bool, True) is False:
            skipped += 1
            continue
        paragraphs = r.items("paragraphs")
        if not paragraphs:
            raise r.fail("paragraphs", "at least one paragraph", [])
        docs, gold = [], []
        for j, p in enumerate(paragraphs):
            if p.get("idx", int) != j:
                raise p.fail("idx", f"{j} (paragraphs in idx order)", p.obj.get("idx"))
            docs.append(_document(p.get("title", str, ""), p.get("paragraph_text", str)))
            if p.get("is_supporting", bool, False):
                gold.append(j)
        steps = r.items("question_decomposition", [])
        helpful, bridge = [], []
        for s in steps[:-1]:  # every hop but the last is a bridge towards the answer
            bridge.append(str(s.get("answer", (str, int))))
            idx = s.get("paragraph_support_idx", int, None)
            if idx is not None:
                if not 0 <= idx < len(docs):
                    raise s.fail("paragraph_support_idx", f"an index below {len(docs)}", idx)
                helpful.append(idx)
        if not bridge and steps:  # 1 hop: the fact that answers it is what a helpful response cites
            idx = steps[-1].get("paragraph_support_idx", int, None)
            helpful += [idx] if idx is not None and 0 <= idx < len(docs) else []
        answers = [r.get("answer", str), *r.strings("answer_aliases", [])]
        ex_id = r.get("id", str)
        # The hop count: MuSiQue's ids carry it (2hop__, 3hop1__, 4hop3__); otherwise the decomposition's length.
        m = _HOPS_RE.match(ex_id)
        hops = int(m.group(1)) if m else max(1, len(steps))
        if not _answer_in(answers, docs):
            report.answer_not_in_paragraphs += 1
        out.append({"id": ex_id, "dataset": "musique", "documents": docs, "history": [],
                    "question": r.get("question", str), "answers": answers,
                    "gold_doc_idxs": gold, "helpful_doc_idxs": helpful, "bridge": bridge, "hops": hops})
        report.origins.append((path, lineno))
    report.skipped_unanswerable += skipped
    return out, skipped


def _history(r: _Row) -> list[dict[str, str]]:
    turns = []
    for i, t in enumerate(r.get("dialogue_history", list, [])):
        if isinstance(t, str):  # "user: ..." / "assistant: ..." strings are accepted too
            role, _, content = t.partition(":")
            role = role.strip().lower()
            if role not in ("user", "assistant") or not content.strip():
                raise r.fail(f"dialogue_history[{i}]", "'user: ...' or 'assistant: ...'", t)
            turns.append({"role": role, "content": content.strip()})
        elif isinstance(t, dict):
            role, content = t.get("role"), t.get("content")
            if role not in ("user", "assistant") or not isinstance(content, str):
                raise r.fail(f"dialogue_history[{i}]", "{role: user|assistant, content: string}", t)
            turns.append({"role": role, "content": content})
        else:
            raise r.fail(f"dialogue_history[{i}]", "a string or an object", t)
    return turns


def parse_ecommerce(rows: list[tuple[int, dict[str, Any]]], path: str,
                    report: SourceReport | None = None) -> list[dict[str, Any]]:
    """ePQA-shaped records -> examples. Document label 2 answers the question (gold), label 1
    helps (what a helpful response adds), label 0 is irrelevant."""
    out = []
    report = report if report is not None else SourceReport(path)
    for lineno, obj in rows:
        report.records += 1
        r = _Row(path, lineno, obj)
        docs, gold, helpful = [], [], []
        title = r.get("product_title", str, "")
        if title:
            docs.append(f"product : {title}")
        for d in r.items("documents"):
            label = d.get("label", int, 0)
            if label not in (0, 1, 2):
                raise d.fail("label", "0, 1 or 2", label)
            (gold if label == 2 else helpful if label == 1 else []).append(len(docs))
            docs.append(" ".join(d.get("text", str).split()))
        if not docs:
            raise r.fail("documents", "at least one document", [])
        qid = r.get("qid", (str, int))
        out.append({"id": str(qid), "dataset": "ecommerce", "documents": docs, "history": _history(r),
                    "question": r.get("question", str), "answers": r.strings("reference_answers", []),
                    "gold_doc_idxs": gold, "helpful_doc_idxs": helpful, "bridge": [],
                    "hops": 1})  # one attribute document answers a product question
        report.origins.append((path, lineno))
    return out


def _id_hash(example_id: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{example_id}".encode()).digest()[:8], "little")


def split(examples: list[dict[str, Any]], cfg: IngestConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, dev, eval) by a hash of the id: an example's split never depends on the others.
    Eval takes the hash range [0, eval_fraction), dev the next dev_fraction, train the rest."""
    train, dev, evals = [], [], []
    hashes = {e["id"]: _id_hash(e["id"], cfg.seed) for e in examples}
    for ds in sorted({e["dataset"] for e in examples}):
        rows = [e for e in examples if e["dataset"] == ds]
        unit = {e["id"]: (hashes[e["id"]] % 1_000_000) / 1_000_000 for e in rows}

        def band(lo: float, hi: float, cap: int) -> set[str]:
            flagged = sorted((e for e in rows if lo <= unit[e["id"]] < hi), key=lambda e: hashes[e["id"]])
            return {e["id"] for e in flagged[:cap]}
        eval_ids = band(0.0, cfg.eval_fraction, cfg.max_eval_per_dataset)
        dev_ids = band(cfg.eval_fraction, cfg.eval_fraction + cfg.dev_fraction, cfg.max_dev_per_dataset)
        ds_train = [e for e in rows if e["id"] not in eval_ids | dev_ids]
        if cfg.max_train_per_dataset is not None:
            ds_train = ds_train[:cfg.max_train_per_dataset]
        train += ds_train
        dev += [e for e in rows if e["id"] in dev_ids]
        evals += [e for e in rows if e["id"] in eval_ids]
    # A deterministic shuffle, so that any prefix (sample.max_examples, grpo.max_prompts) mixes
    # the datasets in proportion.
    order = lambda e: hashes[e["id"]] % 1_000_003  # noqa: E731
    held_out = lambda e: (e["dataset"], order(e))  # noqa: E731
    return sorted(train, key=order), sorted(dev, key=held_out), sorted(evals, key=held_out)


def ingest(cfg: IngestConfig) -> tuple[list[dict], list[dict], list[dict], dict[str, list[dict]], dict[str, Any]]:
    """-> (train, dev, eval, raw synthetic files by name, stats)."""
    examples: list[dict[str, Any]] = []
    origins: list[tuple[str, int]] = []
    raw: dict[str, list[dict]] = {}
    reports: dict[str, SourceReport] = {}

    def add(name: str, key: str, report: SourceReport, ex: list[dict[str, Any]]) -> None:
        if not report.records:
            raise InputError(f"{report.path}: no records (an empty file); ingest.sources names {name}, so it must "
                             "yield examples (drop it from sources, or point its path at the data)")
        if not ex:
            raise InputError(f"{report.path}: {report.records} record(s) but no example (all unanswerable); "
                             f"ingest.sources names {name}, so it must yield examples")
        if report.answer_not_in_paragraphs:
            log.warning("ingest: %s: %d of %d records have an answer that appears in no paragraph (kept; counted in "
                        "stats.json)", report.path, report.answer_not_in_paragraphs, len(ex))
        reports[key] = report
        examples.extend(ex)
        origins.extend(report.origins)

    if "synthetic" in cfg.sources:
        raw["musique_synthetic.jsonl"] = synth.musique_rows(cfg.synthetic_musique_n, cfg.seed, cfg.synthetic_hop_mix)
        raw["ecommerce_synthetic.jsonl"] = synth.ecommerce_rows(cfg.synthetic_ecommerce_n, cfg.seed)
        report = SourceReport("synthetic musique", "musique")
        ex, _ = parse_musique(list(enumerate(raw["musique_synthetic.jsonl"], 1)), report.path, report)
        add("synthetic", "synthetic_musique", report, ex)
        report = SourceReport("synthetic ecommerce", "ecommerce")
        add("synthetic", "synthetic_ecommerce", report,
            parse_ecommerce(list(enumerate(raw["ecommerce_synthetic.jsonl"], 1)), report.path, report))
    if "musique" in cfg.sources:
        report = SourceReport(str(cfg.musique_path), "musique")
        ex, _ = parse_musique(list(iter_jsonl(cfg.musique_path)), report.path, report)
        add("musique", "musique", report, ex)
    if "ecommerce" in cfg.sources:
        report = SourceReport(str(cfg.ecommerce_path), "ecommerce")
        ex = parse_ecommerce(list(iter_jsonl(cfg.ecommerce_path)), report.path, report)
        add("ecommerce", "ecommerce", report, ex)
    check_unique_ids(examples, origins)
    stats: dict[str, Any] = {"skipped_unanswerable": sum(r.skipped_unanswerable for r in reports.values()),
                             "sources": {name: r.stats() for name, r in reports.items()}}
    train, dev, evals = split(examples, cfg)
    for name, part in (("train", train), ("dev", dev), ("eval", evals)):
        stats[name] = dict(Counter(e["dataset"] for e in part))
    for ds, n in Counter(e["dataset"] for e in examples).items():
        # Every later stage works per dataset: an empty side would fail far from its cause.
        if not stats["train"].get(ds) or not stats["eval"].get(ds):
            paths = [r.path for r in reports.values() if r.dataset == ds]
            raise InputError(f"ingest: dataset {ds} ({', '.join(paths) or 'its source'}): {n} example(s) split into "
                             f"{stats['train'].get(ds, 0)} train and {stats['eval'].get(ds, 0)} eval; each needs "
                             f"at least one (add examples, or change eval_fraction={cfg.eval_fraction}, "
                             f"dev_fraction={cfg.dev_fraction}, max_eval_per_dataset={cfg.max_eval_per_dataset}, "
                             f"max_train_per_dataset={cfg.max_train_per_dataset})")
    return train, dev, evals, raw, stats


def check_unique_ids(examples: list[dict[str, Any]], origins: list[tuple[str, int]]) -> None:
    """InputError naming both occurrences (file and line) of each duplicated id (up to five)."""
    first: dict[str, tuple[str, int]] = {}
    dupes = []
    for e, (path, line) in zip(examples, origins, strict=True):
        if e["id"] in first:
            (p0, l0) = first[e["id"]]
            where = f"{p0}: line {l0} and line {line}" if p0 == path else f"{p0}: line {l0} and {path}: line {line}"
            dupes.append(f"{e['id']!r} ({where})")
        else:
            first[e["id"]] = (path, line)
    if dupes:
        raise InputError(f"duplicate example id(s): {'; '.join(dupes[:5])}"
                         + (f"; and {len(dupes) - 5} more" if len(dupes) > 5 else "") + ": ids must be unique")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="data/ingest")
    args = ap.parse_args(argv)
    cfg = load_config(IngestConfig, "ingest", args.params)
    train, dev, evals, raw, stats = ingest(cfg)
    out = Path(args.out)
    validate(train, EXAMPLES, out / "train.jsonl")
    validate(evals, EXAMPLES, out / "eval.jsonl")
    validate(dev, EXAMPLES, out / "dev.jsonl")
    write_jsonl(out / "dev.jsonl", dev)
    for name, rows in raw.items():
        write_jsonl(out / "raw" / name, rows)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "eval.jsonl", evals)
    write_json(out / "stats.json", stats)
    from steps.core import tracking
    tracking.log_stage("ingest", cfg, metrics={f"{k}_{ds}": n for k in ("train", "dev", "eval")
                                               for ds, n in stats[k].items()})
    print(f"ingest: train {stats['train']} dev {stats['dev']} eval {stats['eval']} -> {out}")


if __name__ == "__main__":
    main()
