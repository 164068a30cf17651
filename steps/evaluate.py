"""evaluate: every model on the eval split of every dataset, scored by the shared judge.

Models: teacher and student_base (from pretrain_demo/models.json), rft and rft_grpo (given as
--model NAME=DIR). Per model and dataset: correctness and helpfulness (the judge stage's
judge), MuSiQue answer EM/F1 with the official normalisation (null for e-commerce, where
answers are sentences), tokens per response (thinking included), decode TFLOPs per response
(convention in steps.core.modeling; prefill reported apart), and latency: batched wall time
per response and the median single-request latency over `latency_probe_n` examples.

Outputs: predictions.jsonl (predictions schema), stats.json (per model, how many prompts lost
documents to `max_prompt_tokens`; a warning says so too), reports/summary.json and summary.md,
DVC metrics (reports/metrics.json) and plots (reports/plots/). Generation is resumable per
(model, dataset, example).

A model's scored predictions are also kept in `cache_dir` (outside DVC's outputs), keyed by the
content of its directory, the eval examples, the settings that change a prediction and the
source of the code that makes one: experiments that change one model re-use the others'
predictions (greedy decoding makes a hit the same result). The single-request latency probe is
always re-measured; the batched wall time of a cache hit is the one measured when its
predictions were generated, and the summary marks those models (`cached`).

    python -m steps.evaluate score-musique GOLD.jsonl PRED.jsonl   # official-format scoring
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core import prompts as P
from steps.core.backends import SamplingParams, make_backend
from steps.core.config import config_hash, help_field, load_config
from steps.core.io import InputError, ShardWriter, read_json, read_jsonl, write_json, write_jsonl, write_text
from steps.core.judges import make_judge
from steps.core.metrics import exact_match, extract_answer, max_over, token_f1
from steps.core.schemas import EXAMPLES, PREDICTIONS, read_validated, validate

MODEL_ORDER = ("teacher", "student_base", "rft", "rft_grpo")
log = logging.getLogger(__name__)
# Bump when the layout of a cached prediction file changes.
CACHE_VERSION = "1"
# Settings that cannot change a prediction, so a change to them keeps the cache.
NOT_IN_CACHE_KEY = ("latency_probe_n", "cache_dir")
# The code that generates and scores a prediction: an edit to it invalidates the cache.
CACHE_SOURCES = ("evaluate.py", "core/backends.py", "core/backend_openai.py", "core/backend_vllm.py",
                 "core/prompts.py", "core/judges.py", "core/judge_llm.py", "core/metrics.py", "core/modeling.py")


@dataclass(frozen=True)
class EvaluateConfig:
    backend: str = help_field("transformers", "generation back end for all models")
    backend_options: dict = field(default_factory=dict, metadata={"help": "passed to the back end"})
    temperature: float = help_field(0.0, "0 = greedy, for reproducible scores")
    max_new_tokens: int = help_field(256, "generation budget, thinking included")
    max_examples_per_dataset: int | None = help_field(None, "cap per dataset (None: the whole eval split)")
    latency_probe_n: int = help_field(8, "examples decoded one at a time per model and dataset for latency")
    judge: str = help_field("rule", "judge kind (as in the judge stage)")
    judge_options: dict = field(default_factory=dict, metadata={"help": "passed to the judge"})
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true}"})
    max_prompt_tokens: int | None = help_field(4096, "prompt budget; the least relevant documents are dropped "
                                                     "to fit (null: no budget)")
    cache_dir: str | None = help_field(".cache/evaluate", "per-model prediction cache (git- and dvc-ignored); null: off")
    seed: int = help_field(0, "from base.seed")


def cache_key(cfg: EvaluateConfig, model_dir: str | Path, examples: list[dict[str, Any]]) -> str:
    """What a model's predictions depend on: the bytes of its files (not its path, and not the
    lineage in meta.json, which records when and where it was made), the examples, the
    generation and scoring settings, and the code."""
    h = hashlib.sha256()
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_CACHE_KEY}
    h.update(json.dumps([CACHE_VERSION, settings, examples], sort_keys=True, default=str).encode())
    steps_dir = Path(__file__).parent
    root = Path(model_dir)
    files = [(f"code/{s}", steps_dir / s) for s in CACHE_SOURCES]
    files += [(f"model/{f.relative_to(root).as_posix()}", f) for f in sorted(root.rglob("*"))
              if f.is_file() and f.relative_to(root) != Path("meta.json")]
    for name, f in files:
        h.update(f"\0{name}\0{f.stat().st_size}\0".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def read_cache(path: Path, name: str, examples: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The cached predictions for exactly these examples, renamed to `name`; None on a miss."""
    if not path.exists():
        return None
    try:
        rows = read_jsonl(path)
    except InputError as e:
        print(f"evaluate: {name}: ignoring an unreadable cache file ({e})", file=sys.stderr)
        return None
    if sorted((r.get("dataset"), r.get("id")) for r in rows) != sorted((e["dataset"], e["id"]) for e in examples):
        print(f"evaluate: {name}: {path} does not cover the eval examples; regenerating", file=sys.stderr)
        return None
    return [{**r, "model": name} for r in rows]


def score(example: dict[str, Any], verdict: Any, completion: Any, model: str,
          profile: dict[str, int], latency_s: float) -> dict[str, Any]:
    from steps.core.modeling import decode_flops, prefill_flops

    _, response = P.split_completion(completion.text)
    predicted = extract_answer(response)
    is_musique = example["dataset"] == "musique"
    return {"model": model, "dataset": example["dataset"], "id": example["id"], "completion": completion.text,
            "response": response, "predicted_answer": predicted,
            "em": max_over(exact_match, predicted, example["answers"]) if is_musique else None,
            "f1": max_over(token_f1, predicted, example["answers"]) if is_musique else None,
            "correct": int(verdict.correct), "helpful": int(verdict.helpful),
            "completion_tokens": int(completion.completion_tokens),
            "decode_tflops": decode_flops(profile, completion.prompt_tokens, completion.completion_tokens) / 1e12,
            "prefill_tflops": prefill_flops(profile, completion.prompt_tokens) / 1e12,
            "latency_s": float(latency_s)}


def evaluate_model(cfg: EvaluateConfig, name: str, model_dir: str, examples: list[dict[str, Any]],
                   shards: ShardWriter, judge: Any, generate: bool = True) -> tuple[dict[str, float], int]:
    """Generate and score what is not in `shards` yet (nothing when `generate` is off: the
    predictions came from the cache). Returns the median single-request latency per dataset,
    and how many prompts lost documents to the budget."""
    from steps.core.modeling import load_profile

    done = shards.done_keys()
    backend = make_backend(cfg.backend, model=model_dir, **cfg.backend_options)
    profile = load_profile(model_dir)
    tok = getattr(backend, "tokenizer", None)
    sampling = SamplingParams(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    built = {e["id"]: P.build(e, tok, cfg.chat_template_kwargs, cfg.max_prompt_tokens) for e in examples}
    over_budget = sum(p.meta["dropped_documents"] > 0 for p in built.values())
    if over_budget:
        log.warning("evaluate: %s: %d of %d prompts exceeded max_prompt_tokens=%s; their least relevant "
                    "documents were dropped", name, over_budget, len(examples), cfg.max_prompt_tokens)
    todo = [e for e in examples if generate and (name, e["dataset"], e["id"]) not in done]
    prompts = [built[e["id"]] for e in todo]
    if todo:
        def persist(indices: list[int], comps: list[list[Any]]) -> None:
            exs = [todo[i] for i in indices]
            verdicts = judge.judge(exs, [P.split_completion(c[0].text)[1] for c in comps])
            shards.append([score(e, v, c[0], name, profile, c[0].latency_s) for e, v, c in zip(exs, verdicts, comps)])
        print(f"evaluate: {name}: {len(todo)} examples", file=sys.stderr)
        backend.generate(prompts, sampling, on_batch=persist)
    latency: dict[str, float] = {}
    for ds in sorted({e["dataset"] for e in examples}):
        probe = [e for e in examples if e["dataset"] == ds][: cfg.latency_probe_n]
        times = []
        for e in probe:
            t0 = time.perf_counter()
            backend.generate([built[e["id"]]], sampling)
            times.append(time.perf_counter() - t0)
        latency[ds] = statistics.median(times) if times else 0.0
    backend.close()
    return latency, over_budget


def summarise(predictions: list[dict[str, Any]], latency: dict[str, dict[str, float]],
              cached: set[str] = frozenset()) -> dict[str, Any]:
    out: dict[str, Any] = {"datasets": {}}
    for ds in sorted({p["dataset"] for p in predictions}):
        out["datasets"][ds] = {}
        for model in [m for m in MODEL_ORDER if m in {p["model"] for p in predictions}] + sorted(
                {p["model"] for p in predictions} - set(MODEL_ORDER)):
            rows = [p for p in predictions if p["dataset"] == ds and p["model"] == model]
            if not rows:
                continue
            n = len(rows)

            def mean(key: str) -> float | None:
                vals = [r[key] for r in rows if r[key] is not None]
                return sum(vals) / len(vals) if vals else None
            out["datasets"][ds][model] = {
                "correctness": mean("correct"), "helpfulness": mean("helpful"), "em": mean("em"), "f1": mean("f1"),
                "tokens_per_response": mean("completion_tokens"), "decode_tflops_per_response": mean("decode_tflops"),
                "prefill_tflops_per_response": mean("prefill_tflops"),
                "latency_s_per_response_batched": mean("latency_s"),
                "latency_s_single_request": latency.get(model, {}).get(ds), "n": n, "cached": model in cached}
    return out


def markdown(summary: dict[str, Any]) -> str:
    def fmt(v: Any, pct: bool = False, digits: int = 1) -> str:
        if v is None:
            return "–"
        return f"{100 * v:.1f}" if pct else f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    lines = []
    for ds, models in summary["datasets"].items():
        lines += [f"### {ds}", "",
                  "| model | correct % | helpful % | EM % | F1 % | tokens/response | decode GFLOPs/response | latency ms (1 req) | n |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m, s in models.items():
            lat = None if s["latency_s_single_request"] is None else 1000 * s["latency_s_single_request"]
            lines.append(f"| {m} | {fmt(s['correctness'], True)} | {fmt(s['helpfulness'], True)} | {fmt(s['em'], True)} | "
                         f"{fmt(s['f1'], True)} | {fmt(s['tokens_per_response'])} | "
                         f"{fmt(s['decode_tflops_per_response'] * 1e3, digits=3)} | {fmt(lat)} | {s['n']} |")
        lines.append("")
    cached = sorted({m for models in summary["datasets"].values() for m, s in models.items() if s.get("cached")},
                    key=lambda m: (MODEL_ORDER + (m,)).index(m))
    if cached:
        lines += [f"Predictions of {', '.join(cached)} came from the evaluation cache: their batched latency "
                  "was measured when they were generated, the single-request latency now.", ""]
    checks = effect_checks(summary)
    if checks:
        lines += ["### LiveThinking's effect on the musique eval set", "", "| claim | measured | target | holds |",
                  "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['value']:+.3f} | {c['target']:+.3f} | {'yes' if c['holds'] else 'no'} |"
                  for c in checks]
        lines.append("")
    return "\n".join(lines)


def effect_checks(summary: dict[str, Any], dataset: str = "musique") -> list[dict[str, Any]]:
    """LiveThinking's effect at small scale, as checkable claims on one dataset's eval set."""
    ms = summary["datasets"].get(dataset, {})
    need = ("teacher", "student_base", "rft", "rft_grpo")
    if not all(m in ms for m in need):
        return []
    t, b, r, g = (ms[m] for m in need)

    def claim(text: str, value: float, target: float, ok: bool) -> dict[str, Any]:
        return {"claim": text, "value": round(value, 4), "target": round(target, 4), "holds": bool(ok)}
    return [
        claim("rft correctness >= student_base + 10 points", r["correctness"] - b["correctness"], 0.10,
              r["correctness"] >= b["correctness"] + 0.10),
        claim("rft_grpo tokens/response <= 0.5 x rft", g["tokens_per_response"] / max(r["tokens_per_response"], 1e-9),
              0.5, g["tokens_per_response"] <= 0.5 * r["tokens_per_response"]),
        claim("rft_grpo EM >= rft EM - 3 points", (g["em"] or 0) - (r["em"] or 0), -0.03,
              (g["em"] or 0) >= (r["em"] or 0) - 0.03),
        claim("rft_grpo helpfulness >= rft - 5 points", g["helpfulness"] - r["helpfulness"], -0.05,
              g["helpfulness"] >= r["helpfulness"] - 0.05),
        claim("rft_grpo decode TFLOPs <= 0.25 x teacher",
              g["decode_tflops_per_response"] / max(t["decode_tflops_per_response"], 1e-30), 0.25,
              g["decode_tflops_per_response"] <= 0.25 * t["decode_tflops_per_response"]),
    ]


def plot(summary: dict[str, Any], out_png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steps.core.io import atomic_path

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


def run(cfg: EvaluateConfig, models: dict[str, str], examples: list[dict[str, Any]], work: Path,
        cache_dir: Path | str | None = None) -> tuple[list[dict], dict, set[str], dict[str, int]]:
    """Predictions of every model, median single-request latency per model and dataset, the
    models whose predictions came from `cache_dir`, and the prompts cut to the budget per model."""
    if cfg.max_examples_per_dataset:
        examples = [e for ds in sorted({e["dataset"] for e in examples})
                    for e in [x for x in examples if x["dataset"] == ds][: cfg.max_examples_per_dataset]]
    shards = ShardWriter(work, key_fields=("model", "dataset", "id"))
    judge = make_judge(cfg.judge, **cfg.judge_options)
    wanted = {(e["dataset"], e["id"]) for e in examples}
    preds: list[dict[str, Any]] = []
    latency: dict[str, dict[str, float]] = {}
    over_budget: dict[str, int] = {}
    hits: set[str] = set()
    for name, path in models.items():
        # Only a local directory has content to key on (a served model's name has not).
        local = cache_dir and Path(path).is_dir()
        cache = Path(cache_dir) / f"{cache_key(cfg, path, examples)}.jsonl" if local else None
        rows = read_cache(cache, name, examples) if cache else None
        if rows is not None:
            hits.add(name)
            print(f"evaluate: {name}: cache hit, {len(rows)} predictions from {cache}", file=sys.stderr)
        latency[name], over_budget[name] = evaluate_model(cfg, name, path, examples, shards, judge, generate=rows is None)
        if rows is None:
            rows = [r for r in shards.rows() if r["model"] == name and (r["dataset"], r["id"]) in wanted]
            if cache:
                write_jsonl(cache, rows)
                print(f"evaluate: {name}: cache miss, {len(rows)} predictions stored in {cache}", file=sys.stderr)
        preds += rows
    return preds, latency, hits, over_budget


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["score-musique"]:
        from steps.core.musique_score import main as score_main
        raise SystemExit(score_main(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/eval.jsonl")
    ap.add_argument("--models", default="data/pretrain_demo/models.json")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR", help="an extra model to evaluate")
    ap.add_argument("--out", default="data/evaluate")
    ap.add_argument("--reports", default="reports")
    args = ap.parse_args(argv)
    cfg = load_config(EvaluateConfig, "evaluate", args.params)
    registry = read_json(args.models)
    models = {"teacher": registry["teacher"], "student_base": registry["student_base"]}
    for spec in args.model:
        name, _, path = spec.partition("=")
        models[name] = path
    examples = read_validated(args.data, EXAMPLES)
    out, reports = Path(args.out), Path(args.reports)
    work = out / ".resume" / config_hash(cfg, models, [e["id"] for e in examples])
    preds, latency, cached, over_budget = run(cfg, models, examples, work, cfg.cache_dir)
    validate(preds, PREDICTIONS, out / "predictions.jsonl")
    summary = summarise(preds, latency, cached)
    write_jsonl(out / "predictions.jsonl", preds)
    write_json(out / "stats.json", {"max_prompt_tokens": cfg.max_prompt_tokens, "prompts_over_budget": over_budget})
    summary["effect_checks"] = {"musique": effect_checks(summary)}
    write_json(reports / "summary.json", summary)
    write_text(reports / "summary.md", markdown(summary))
    flat = {f"{ds}.{m}.{k}": v for ds, ms in summary["datasets"].items() for m, s in ms.items() for k, v in s.items()
            if v is not None and k in ("correctness", "helpfulness", "em", "f1", "tokens_per_response",
                                       "decode_tflops_per_response")}
    write_json(reports / "metrics.json", flat)
    write_jsonl(reports / "plots" / "models.jsonl",
                [{"dataset": ds, "model": m, "tokens_per_response": s["tokens_per_response"],
                  "correctness": s["correctness"]} for ds, ms in summary["datasets"].items() for m, s in ms.items()])
    plot(summary, reports / "plots" / "tokens_vs_correctness.png")
    import shutil
    shutil.rmtree(out / ".resume", ignore_errors=True)
    from steps.core import tracking
    tracking.log_stage("evaluate", cfg, metrics={k.replace(".", "/"): v for k, v in flat.items()},
                       artifacts=[reports / "summary.md", reports / "plots" / "tokens_vs_correctness.png"])
    print(markdown(summary))


if __name__ == "__main__":
    main()
