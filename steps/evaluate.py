"""evaluate: one model row of the registry on the eval split of every dataset, scored by the shared judge.

dvc.yaml runs this stage once per row of params.yaml `models` (`evaluate@<name>`, a foreach), so
DVC's cache re-evaluates only the model that changed, and `dvc exp run` restores the others from
its run cache. The row's `protocol` names the rollout that decodes it (steps.core.rollouts), the
same rollout its training used. Per example: correctness and helpfulness (the judge stage's
judge, one verdict per completion), MuSiQue answer EM/F1 with the official normalisation (null
for e-commerce, where answers are sentences), tokens per response (thinking included; inserted
tokens counted apart in `external_tokens`), decode TFLOPs per response (convention in
steps.core.modeling; prefill apart) and the batched wall time per response; per dataset, the
median single-request latency over `latency_probe_n` examples.

Outputs (under --out, i.e. data/evaluate/<name>/): predictions.jsonl (predictions schema) and
stats.json (latency, prompts cut to `max_prompt_tokens`, and `model_digest`, the content hash
of the model directory, so that anything downstream of the evaluations depends on the weights).
steps/report.py gathers every row into reports/summary.{json,md} and the plots.

Resumable: predictions are persisted in shards under `.resume/<key>/` as batches finish; the key
covers the model's content (weights and tokenizer), the examples, the settings, the protocol
and the code, so a retrained model never inherits rows of the old one.

    python -m steps.evaluate --model rft_grpo --out data/evaluate/rft_grpo
    python -m steps.evaluate score-musique GOLD.jsonl PRED.jsonl   # official-format scoring
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core import prompts as P
from steps.core.backends import SamplingParams, make_backend
from steps.core.config import config_hash, help_field, load_config
from steps.core.io import ShardWriter, write_json, write_jsonl
from steps.core.judges import make_judge
from steps.core.metrics import exact_match, extract_answer, max_over, token_f1
from steps.core.schemas import EXAMPLES, PREDICTIONS, read_validated, validate

log = logging.getLogger(__name__)
# The code a prediction depends on (its resume key covers their sources, and every rollout module's).
CODE = ("steps.evaluate", "steps.core.backends", "steps.core.prompts", "steps.core.judges", "steps.core.metrics",
        "steps.core.modeling", "steps.core.rollouts")


def rollout_modules() -> tuple[str, ...]:
    """Every module of the rollouts package: a protocol may live in any of them (plugins)."""
    import pkgutil

    from steps.core import rollouts

    return tuple(f"steps.core.rollouts.{m.name}" for m in pkgutil.iter_modules(rollouts.__path__))


@dataclass(frozen=True)
class EvaluateConfig:
    backend: str = help_field("transformers", "generation back end for all models")
    backend_options: dict = field(default_factory=dict, metadata={"help": "passed to the back end"})
    temperature: float = help_field(0.0, "0 = greedy, for reproducible scores", ge=0.0)
    max_new_tokens: int = help_field(256, "generation budget, thinking included", ge=1)
    max_examples_per_dataset: int | None = help_field(None, "cap per dataset (None: the whole eval split)", ge=1)
    latency_probe_n: int = help_field(8, "examples decoded one at a time per dataset for latency", ge=0)
    judge: str = help_field("rule", "judge kind (as in the judge stage)")
    judge_options: dict = field(default_factory=dict, metadata={"help": "passed to the judge"})
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true}"})
    max_prompt_tokens: int | None = help_field(4096, "prompt budget; the least relevant documents are dropped "
                                                     "to fit (null: no budget)", ge=1)
    seed: int = help_field(0, "from base.seed")


def score(example: dict[str, Any], verdict: Any, completion: Any, model: str,
          profile: dict[str, int]) -> dict[str, Any]:
    """One prediction row from a RolloutCompletion and its verdict."""
    from steps.core.modeling import decode_flops, prefill_flops

    response = completion.response_text
    predicted = extract_answer(response)
    is_musique = example["dataset"] == "musique"
    n_tokens = len(completion.token_ids)
    return {"model": model, "dataset": example["dataset"], "id": example["id"], "hops": example["hops"],
            "completion": completion.text,
            "response": response, "predicted_answer": predicted,
            "em": max_over(exact_match, predicted, example["answers"]) if is_musique else None,
            "f1": max_over(token_f1, predicted, example["answers"]) if is_musique else None,
            "correct": int(verdict.correct), "helpful": int(verdict.helpful),
            "completion_tokens": n_tokens, "external_tokens": completion.external_tokens,
            # The policy's own decode cost; a protocol that inserts another model's tokens adds
            # that model's cost to `extras` (its numbers, its convention).
            "decode_tflops": decode_flops(profile, completion.prompt_tokens, completion.policy_tokens) / 1e12,
            "prefill_tflops": prefill_flops(profile, completion.prompt_tokens) / 1e12,
            "latency_s": float(completion.latency_s),
            "extras": {k: float(v) for k, v in completion.meta.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}}


def select(examples: list[dict[str, Any]], cap: int | None) -> list[dict[str, Any]]:
    """The first `cap` examples of each dataset, datasets in name order."""
    if not cap:
        return examples
    return [e for ds in sorted({e["dataset"] for e in examples})
            for e in [x for x in examples if x["dataset"] == ds][:cap]]


def evaluate_model(cfg: EvaluateConfig, name: str, model_dir: str, examples: list[dict[str, Any]], work: Path,
                   protocol: str = "plain", protocol_options: dict[str, Any] | None = None,
                   ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Predictions for `examples` (resumed from shards in `work`) and the model's stats."""
    from steps.core.modeling import load_profile
    from steps.core.rollouts import make_rollout

    examples = select(examples, cfg.max_examples_per_dataset)
    shards = ShardWriter(work, key_fields=("dataset", "id"))
    done = shards.done_keys()
    judge = make_judge(cfg.judge, **cfg.judge_options)
    backend = make_backend(cfg.backend, model=model_dir, **cfg.backend_options)
    rollout = make_rollout(protocol, backend, **(protocol_options or {}))
    profile = load_profile(model_dir)
    tok = getattr(backend, "tokenizer", None)
    template = {**cfg.chat_template_kwargs, **rollout.chat_template_kwargs}
    sampling = SamplingParams(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    built = {e["id"]: P.build(e, tok, template, cfg.max_prompt_tokens) for e in examples}
    over_budget = sum(p.meta["dropped_documents"] > 0 for p in built.values())
    if over_budget:
        log.warning("evaluate: %s: %d of %d prompts exceeded max_prompt_tokens=%s; their least relevant "
                    "documents were dropped", name, over_budget, len(examples), cfg.max_prompt_tokens)
    todo = [e for e in examples if (e["dataset"], e["id"]) not in done]
    if todo:
        def persist(indices: list[int], comps: list[list[Any]]) -> None:
            exs = [todo[i] for i in indices]
            verdicts = judge.judge(exs, [c[0].response_text for c in comps])
            shards.append([score(e, v, c[0], name, profile) for e, v, c in zip(exs, verdicts, comps)])
        print(f"evaluate: {name}: {len(todo)} of {len(examples)} examples to generate", file=sys.stderr)
        rollout.run([built[e["id"]] for e in todo], sampling, on_batch=persist)
    latency: dict[str, float] = {}
    for ds in sorted({e["dataset"] for e in examples}):
        times = []
        for e in [e for e in examples if e["dataset"] == ds][: cfg.latency_probe_n]:
            t0 = time.perf_counter()
            rollout.run([built[e["id"]]], sampling)
            times.append(time.perf_counter() - t0)
        latency[ds] = statistics.median(times) if times else None
    rollout.close()
    by_key = {(r["dataset"], r["id"]): r for r in shards.rows()}
    preds = [by_key[(e["dataset"], e["id"])] for e in examples]
    return preds, {"latency_s_single_request": latency, "prompts_over_budget": over_budget,
                   "max_prompt_tokens": cfg.max_prompt_tokens, "n": len(preds)}


def resume_key(cfg: EvaluateConfig, model_digest: str, protocol: str, options: dict[str, Any],
               examples: list[dict[str, Any]]) -> str:
    """Everything a prediction depends on: the model's content, the settings, the protocol, the
    examples and the code (a killed run resumes only what the same inputs would write again)."""
    from steps.core.fingerprint import code_digest

    return config_hash(dataclasses.asdict(cfg), model_digest, protocol, options, examples, code_digest(*CODE, *rollout_modules()))


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["score-musique"]:
        from steps.core.musique_score import main as score_main
        raise SystemExit(score_main(argv[1:]))
    from steps.core import tracking
    from steps.core.fingerprint import dir_digest
    from steps.core.registry import row as registry_row

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--model", required=True, help="a row of params.yaml `models`")
    ap.add_argument("--data", default="data/ingest/eval.jsonl")
    ap.add_argument("--out", help="default: data/evaluate/<model>")
    args = ap.parse_args(argv)
    cfg = load_config(EvaluateConfig, "evaluate", args.params)
    model = registry_row(args.model, args.params)
    out = Path(args.out or f"data/evaluate/{model.name}")
    if not (Path(model.path) / "config.json").exists():
        raise FileNotFoundError(f"{args.params}: models.{model.name}.path: {model.path} is not a model directory "
                                "(no config.json)")
    examples = read_validated(args.data, EXAMPLES)
    digest = dir_digest(model.path)
    work = out / ".resume" / resume_key(cfg, digest, model.protocol, model.options, examples)
    preds, stats = evaluate_model(cfg, model.name, model.path, examples, work, model.protocol, model.options)
    validate(preds, PREDICTIONS, out / "predictions.jsonl")
    write_jsonl(out / "predictions.jsonl", preds)
    write_json(out / "stats.json", {"model": model.name, "path": model.path, "protocol": model.protocol,
                                    "model_digest": digest, **stats})
    correct = {ds: statistics.fmean(p["correct"] for p in preds if p["dataset"] == ds)
               for ds in sorted({p["dataset"] for p in preds})}
    tracking.log_stage(f"evaluate@{model.name}", cfg, metrics={f"{ds}/correctness": v for ds, v in correct.items()})
    shutil.rmtree(out / ".resume", ignore_errors=True)  # only after the outputs are written
    print(f"evaluate: {model.name}: {len(preds)} predictions -> {out}; correctness {correct}")


if __name__ == "__main__":
    main()
