"""sample: teacher k-sampling — k candidate (thinking trace, response) pairs per training example.

Input: ingest/train.jsonl and pretrain_demo/models.json (the teacher's path). Output:
candidates.jsonl (candidates schema) and stats.json. The generation back end is chosen by
name (`backend`: transformers in-process; vllm and openai plug in through the same protocol).

Resumable: completions are persisted in whole shard files under `.resume/<key>/` as each
batch arrives. The key covers everything a row depends on: the config, the teacher's content
(weights, tokenizer and chat template: `fingerprint.dir_digest`; its path alone, which each row
records, says nothing about what is in it), the input file's bytes, and the source of the code
that renders prompts and generates (`fingerprint.code_digest`).
A run killed at any moment and started again skips what is already there, so nothing is lost or
duplicated; a retrained teacher, a changed config, input or code gets a fresh key, so stale
samples never mix in. The shards are deleted only once the whole stage has succeeded, tracking
included (a tracking outage is survived: steps.core.tracking).

Each (example, sample index) has its own seed (`derive_seed(seed, id, j)`), and every back end
draws it from its own random stream, so a completion does not depend on which other prompts
shared its batch: sampling 3 examples or 40 gives the 3 the same candidates.

With the OpenAI back end, stats.json also holds its `backend` stats (requests, retries, cache
hits, and per server what it served, how many requests were moved off it, which went down).

Prompts fit `max_prompt_tokens` (steps.core.prompts: the least relevant documents are
dropped); stats.json counts the examples that lost documents, and a warning says how many.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core import prompts as P
from steps.core.backends import REGISTRY, Completion, SamplingParams, backend_class, make_backend
from steps.core.config import ConfigError, check_options, config_hash, help_field, load_config
from steps.core.fingerprint import code_digest, dir_digest
from steps.core.io import ShardWriter, read_json, write_json, write_jsonl
from steps.core.schemas import CANDIDATES, EXAMPLES, read_validated, validate


log = logging.getLogger(__name__)

# Set in the environment of the stage's second run under `SampleConfig.python`.
CHILD_ENV = "PIPELINE_STAGE_CHILD"


@dataclass(frozen=True)
class SampleConfig:
    """`python` runs the generation under another interpreter. The in-process vLLM back end
    needs vLLM, which lives in an environment of its own (it pins a web stack that Prefect
    cannot share): on a CPU machine `make install-vllm` creates `.venv-vllm`, and
    `python: .venv-vllm/bin/python` makes the stage run itself again there, with tracking off,
    then log to MLflow from this interpreter once the outputs are written. In the vllm
    container image the interpreter has vLLM already and `python` stays null."""

    backend: str = help_field("transformers", "generation back end: transformers | vllm | openai")
    backend_options: dict = field(default_factory=dict, metadata={
        "help": "passed to the back end (batch_size, base_url, api_key_env, ...); checked against its constructor"})
    model: str | None = help_field(None, "teacher override; default: pretrain_demo/models.json teacher")
    k: int = help_field(4, "candidates per example", ge=1)
    temperature: float = help_field(1.0, "sampling temperature (0: greedy)", ge=0.0)
    top_p: float = help_field(1.0, "nucleus sampling", gt=0.0, le=1.0)
    max_new_tokens: int = help_field(192, "generation budget per candidate, thinking included", ge=1)
    max_examples: int | None = help_field(None, "sample only the first N training examples", ge=1)
    max_examples_per_dataset: dict = field(default_factory=dict, metadata={
        "help": "the share of datasets: at most N examples of each named dataset, the first in file order "
                "(e.g. {musique: 2400, ecommerce: 1200}); unnamed datasets are not capped, and max_examples "
                "still caps the total"})
    shard_size: int = help_field(64, "prompts per generate call (and at most per resume shard)", ge=1)
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true} for Qwen3"})
    max_prompt_tokens: int | None = help_field(4096, "prompt budget; the least relevant documents are dropped "
                                                     "to fit (null: no budget)", ge=1)
    python: str | None = help_field(None, "interpreter that runs the generation (null: this one), e.g. "
                                          ".venv-vllm/bin/python for backend vllm on a CPU machine")
    seed: int = help_field(0, "from base.seed", ge=0)

    def __post_init__(self) -> None:
        if self.backend not in REGISTRY:
            raise ValueError(f"backend: unknown generation back end {self.backend!r}; known: {sorted(REGISTRY)}")
        # The stage sets `model` itself; everything else must be a constructor option of the
        # back end, with the annotated type, so a typo stops here rather than mid-stage.
        check_options(backend_class(self.backend), self.backend_options, "backend_options", reserved=("model",))
        for name, cap in self.max_examples_per_dataset.items():
            if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
                raise ValueError(f"max_examples_per_dataset.{name}: expected a count >= 0, got {cap!r}")


def candidate_row(example: dict[str, Any], j: int, c: Completion, model: str) -> dict[str, Any]:
    thinking, response = P.split_completion(c.text)
    return {"id": example["id"], "dataset": example["dataset"], "sample_idx": j, "completion": c.text,
            "thinking": thinking, "response": response, "completion_tokens": int(c.completion_tokens),
            "finish_reason": c.finish_reason, "model": model}


def select_examples(examples: list[dict[str, Any]], max_examples: int | None,
                    per_dataset: dict[str, int]) -> list[dict[str, Any]]:
    """The examples to sample, in file order: each dataset up to its cap, then the first
    `max_examples` of those. The caps set the share of datasets in the kept traces (a dataset the
    teacher is weaker on yields fewer kept traces per example), at no cost in sampling time."""
    unknown = sorted(set(per_dataset) - {e["dataset"] for e in examples})
    if unknown:  # a misspelt name leaves the real dataset uncapped; a source left out of ingest is fine
        log.warning("sample: max_examples_per_dataset names %s, not among the input's datasets %s: those caps "
                    "select nothing", unknown, sorted({e["dataset"] for e in examples}))
    taken: dict[str, int] = {}
    chosen = []
    for e in examples:
        if max_examples is not None and len(chosen) >= max_examples:
            break
        cap = per_dataset.get(e["dataset"])
        if cap is not None and taken.get(e["dataset"], 0) >= cap:
            continue
        taken[e["dataset"]] = taken.get(e["dataset"], 0) + 1
        chosen.append(e)
    return chosen


def sample(cfg: SampleConfig, examples: list[dict[str, Any]], model: str, work: Path,
           backend: Any = None) -> tuple[list[dict[str, Any]], int]:
    """k candidates per example, resuming from shards in `work`. Returns the rows in input
    order, and how many examples' prompts lost documents to the prompt budget."""
    from tqdm import tqdm

    examples = select_examples(examples, cfg.max_examples, cfg.max_examples_per_dataset)
    if not examples:
        return [], 0
    shards = ShardWriter(work, key_fields=("id", "sample_idx"))
    done = shards.done_keys()
    todo = [e for e in examples if any((e["id"], j) not in done for j in range(cfg.k))]
    # Built even when every shard exists: its tokenizer decides what fits the budget, and the
    # count covers every example, resumed ones included.
    backend = backend or make_backend(cfg.backend, model=model, **cfg.backend_options)
    if getattr(backend, "concurrency", 0) > cfg.shard_size * cfg.k:
        log.warning("sample: each call sends shard_size x k = %d requests, fewer than the back end's concurrency "
                    "%d: raise shard_size to keep the server busy", cfg.shard_size * cfg.k, backend.concurrency)
    tokenizer = getattr(backend, "tokenizer", None)
    prompts = {e["id"]: P.build(e, tokenizer, cfg.chat_template_kwargs, cfg.max_prompt_tokens) for e in examples}
    over_budget = sum(p.meta["dropped_documents"] > 0 for p in prompts.values())
    if over_budget:
        log.warning("sample: %d of %d prompts exceeded max_prompt_tokens=%s; their least relevant documents "
                    "were dropped", over_budget, len(examples), cfg.max_prompt_tokens)
    if todo:
        sampling = SamplingParams(n=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        bar = tqdm(total=len(examples), initial=len(examples) - len(todo), desc="sample", unit="ex")
        for start in range(0, len(todo), cfg.shard_size):
            chunk = todo[start:start + cfg.shard_size]

            def persist(indices: list[int], comps: list[list[Completion]], chunk=chunk) -> None:
                rows = [candidate_row(chunk[i], j, c, model) for i, cs in zip(indices, comps) for j, c in enumerate(cs)]
                shards.append([r for r in rows if (r["id"], r["sample_idx"]) not in done])
                bar.update(len(indices))

            backend.generate([prompts[e["id"]] for e in chunk], sampling, on_batch=persist)
        bar.close()
    by_key = {(r["id"], r["sample_idx"]): r for r in shards.rows()}
    rows = [by_key[(e["id"], j)] for e in examples for j in range(cfg.k) if (e["id"], j) in by_key]
    return rows, over_budget


def stats(rows: list[dict[str, Any]], prompts_over_budget: int = 0) -> dict[str, Any]:
    """Counts per dataset; `truncated_fraction` is of completions cut by max_new_tokens, and
    `prompts_over_budget` counts examples whose prompt lost documents to max_prompt_tokens."""
    out: dict[str, Any] = {"candidates": len(rows), "prompts_over_budget": prompts_over_budget}
    for ds in sorted({r["dataset"] for r in rows}):
        part = [r for r in rows if r["dataset"] == ds]
        out[ds] = {"candidates": len(part),
                   "mean_completion_tokens": sum(r["completion_tokens"] for r in part) / len(part),
                   "truncated_fraction": sum(r["finish_reason"] == "length" for r in part) / len(part)}
    return out


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def resume_key(cfg: SampleConfig, model: str, data: Path | str) -> str:
    """What every candidate row depends on (module docstring): the config, the teacher's content
    (a local directory's files; a served model's name, and the content of a local tokenizer
    that renders or counts for it), the input's bytes and the code that makes a row."""
    model_id = dir_digest(model) if Path(model).exists() else f"served:{model}"
    tokenizer = cfg.backend_options.get("tokenizer")
    tokenizer_id = dir_digest(tokenizer) if isinstance(tokenizer, str) and Path(tokenizer).exists() else None
    module = REGISTRY[cfg.backend].split(":")[0]
    code = code_digest("steps.sample", "steps.core.backends", "steps.core.prompts", module)
    # Transport options (the server list, concurrency, timeouts; a back end's TRANSPORT_OPTIONS)
    # change no row: editing them between a kill and the restart keeps the finished shards.
    transport = getattr(backend_class(cfg.backend), "TRANSPORT_OPTIONS", frozenset())
    kept = dataclasses.replace(cfg, backend_options={k: v for k, v in cfg.backend_options.items() if k not in transport})
    return config_hash(kept, model, model_id, tokenizer_id, _file_digest(Path(data)), code)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--models", default="data/pretrain_demo/models.json")
    ap.add_argument("--out", default="data/sample")
    args = ap.parse_args(argv)
    cfg = load_config(SampleConfig, "sample", args.params)
    out = Path(args.out)
    if os.environ.get(CHILD_ENV):  # the run under `python`: the one that started it logs the stage
        generate(cfg, args.data, args.models, out)
        return
    if cfg.python:
        run_under(cfg.python, sys.argv[1:] if argv is None else argv, args.params)
        st = read_json(out / "stats.json")
    else:
        st = generate(cfg, args.data, args.models, out)
    from steps.core import tracking
    metrics = {f"{ds}_mean_completion_tokens": v["mean_completion_tokens"] for ds, v in st.items()
               if isinstance(v, dict) and "mean_completion_tokens" in v}
    if "backend" in st:  # the OpenAI back end's servers: fail-over at a glance
        metrics["backend_requests_moved"] = st["backend"]["requests_moved"]
        metrics["backend_servers_went_down"] = len(st["backend"]["servers_went_down"])
    # Never raises for a tracking outage (it is kept for `python -m steps.core.tracking replay`).
    tracking.log_stage("sample", cfg, metrics={**metrics, "prompts_over_budget": st["prompts_over_budget"]})
    # Only now, with the outputs written and the stage logged, is the resumable work redundant.
    shutil.rmtree(out / ".resume", ignore_errors=True)


def generate(cfg: SampleConfig, data: str, models: str, out: Path) -> dict[str, Any]:
    """The stage's work: candidates.jsonl and stats.json under `out`; returns the stats."""
    examples = read_validated(data, EXAMPLES)
    model = cfg.model or read_json(models)["teacher"]
    work = out / ".resume" / resume_key(cfg, model, data)
    backend = make_backend(cfg.backend, model=model, **cfg.backend_options)
    rows, over_budget = sample(cfg, examples, model, work, backend)
    validate(rows, CANDIDATES, out / "candidates.jsonl")
    write_jsonl(out / "candidates.jsonl", rows)
    st = stats(rows, over_budget)
    if hasattr(getattr(backend, "stats", None), "summary"):
        # This run's requests (a resumed run counts only its own): per server what it served,
        # what was moved off it, which went down.
        st["backend"] = backend.stats.summary()
    write_json(out / "stats.json", st)
    # The shards stay until main() has logged the stage (they go only once it all succeeded).
    print(f"sample: {len(rows)} candidates -> {out / 'candidates.jsonl'}")
    return st


def run_under(python: str, argv: list[str], params: str) -> None:
    """This stage again, under `python` (SampleConfig docstring); its exit status is ours."""
    if not shutil.which(python):
        raise ConfigError(f"{params}: section 'sample': python {python!r} is not an executable "
                          "(`make install-vllm` creates .venv-vllm/bin/python)")
    env = {**os.environ, CHILD_ENV: "1"}
    code = subprocess.run([python, "-m", "steps.sample", *argv], env=env).returncode
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
