"""pretrain_demo: the embedded default's models, trained from scratch (real models: recorded only).

When params name real model paths (`teacher_path`, `student_path`), this stage only checks
that they exist and records them in models.json; nothing is ever downloaded. Otherwise it
builds a word-level tokenizer over the ingested text and trains two real transformers causal
LMs on "teacher-style" traces written from the gold annotations:

- teacher: a dense Qwen3, larger, trained to be verbose (a random number of filler sentences
  per trace, optional restatement and re-checking) and imperfect (a share of traces carries a
  wrong answer or leaves out the helpful supplement), so that k-sampling and judge filtering
  have something to do;
- student_base: a tiny Qwen3-MoE (so the paper's router load-balancing loss is exercised in
  RFT), smaller and trained on noisier traces: the weaker base that RFT improves.

The two train at once, one process each (`workers`), and each depends on its own seed only.

This stands in for a 670B teacher and a 30B-A3B student; the stages after it cannot tell.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from steps.core import prompts as P
from steps.core.config import help_field, load_config
from steps.core.io import write_json
from steps.core.schemas import EXAMPLES, read_validated

FILLERS = (
    "let me think about this step by step .",
    "i need to read the documents carefully .",
    "first i will find the relevant facts .",
    "i should not confuse the entities in the documents .",
    "this detail is important for the answer .",
    "wait , let me make sure this is right .",
    "there are several documents here , some are not relevant .",
    "i will connect the facts one by one .",
)


@dataclass(frozen=True)
class PretrainDemoConfig:
    teacher_path: str | None = help_field(None, "a real teacher model directory: record it, train nothing")
    student_path: str | None = help_field(None, "a real student base model directory: record it, train nothing")
    teacher_arch: dict = help_field(None, "teacher architecture: type qwen3 + Qwen3Config fields")
    student_arch: dict = help_field(None, "student architecture: type qwen3_moe + Qwen3MoeConfig fields")
    teacher_steps: int = help_field(800, "optimiser steps for the teacher", ge=1)
    student_steps: int = help_field(150, "optimiser steps for the student base", ge=1)
    batch_size: int = help_field(64, "sequences per step", ge=1)
    learning_rate: float = help_field(2e-3, "AdamW peak learning rate (warm-up, then cosine)", gt=0.0)
    warmup_steps: int = help_field(30, "linear warm-up steps", ge=0)
    teacher_p_wrong: float = help_field(0.15, "share of teacher traces with a wrong answer", ge=0.0, le=1.0)
    teacher_p_unhelpful: float = help_field(0.25, "share of teacher traces without the helpful supplement",
                                         ge=0.0, le=1.0)
    student_p_wrong: float = help_field(0.3, "share of student-base traces with a wrong answer", ge=0.0, le=1.0)
    student_p_unhelpful: float = help_field(0.5, "share of student-base traces without the supplement",
                                         ge=0.0, le=1.0)
    max_fillers: int = help_field(6, "teacher verbosity: 0..max_fillers filler sentences per trace", ge=0)
    threads: int = help_field(1, "torch CPU threads per training process", ge=1)
    workers: int = help_field(2, "models trained at once, one process each. The embedded models' matrices are "
                                 "too small to split across threads: on 2 cores two 1-thread processes train "
                                 "both models in about the teacher's time alone (bench/pretrain_workers.py)",
                              ge=1, le=2)
    micro_batches: int = help_field(2, "each batch is sorted by length and cut into this many parts, each "
                                       "padded to its own length (the same gradient, less padding)", ge=1)
    seed: int = help_field(0, "from base.seed", ge=0)

    def __post_init__(self) -> None:
        if (self.teacher_path is None) != (self.student_path is None):
            raise ValueError("set both teacher_path and student_path (real models) or neither (embedded default)")
        if self.teacher_path is None and (not self.teacher_arch or not self.student_arch):
            raise ValueError("the embedded default needs teacher_arch and student_arch")
        for name in ("teacher_p_wrong", "teacher_p_unhelpful", "student_p_wrong", "student_p_unhelpful"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


def write_trace(ex: dict[str, Any], rng: random.Random, pool: list[dict[str, Any]], p_wrong: float,
                p_unhelpful: float, max_fillers: int) -> str:
    """A teacher-style completion `<think> T </think> R` written from an example's annotations."""
    docs = ex["documents"]
    order = list(ex["helpful_doc_idxs"]) + [i for i in ex["gold_doc_idxs"] if i not in ex["helpful_doc_idxs"]]
    if ex["dataset"] == "ecommerce":  # the answer first, the supplement after
        order = list(ex["gold_doc_idxs"]) + list(ex["helpful_doc_idxs"])
    facts = [docs[i] for i in order]
    wrong = rng.random() < p_wrong
    if ex["dataset"] == "musique":
        answer = ex["answers"][0]
        if wrong:
            others = [o["answers"][0] for o in rng.sample(pool, 5) if o["answers"][0] != answer]
            answer = others[0] if others else answer
        answer_sentence = f"the answer is {answer} ."
    else:
        answer_sentence = ex["answers"][0] if ex["answers"] else facts[0]
        if wrong:
            lures = [d for i, d in enumerate(docs) if i not in ex["gold_doc_idxs"] + ex["helpful_doc_idxs"]]
            answer_sentence = rng.choice(lures) if lures else answer_sentence
    # Verbosity in a fixed order (restatement, fillers, facts, re-check), so the reasoning
    # itself stays regular and the lengths vary per example: GRPO needs short samples to reward.
    think: list[str] = []
    if rng.random() < 0.5:
        think.append(f"the question is : {ex['question']}")
    # Filler sentences at most once each and in a fixed order: drawn with replacement, they
    # taught greedy decoding to loop on them until the token budget ran out (the teacher's
    # 1-hop answers, whose prompts are shortest, were nearly all such loops).
    n_fillers = min(rng.randint(0, max_fillers), len(FILLERS))
    think += [FILLERS[i] for i in sorted(rng.sample(range(len(FILLERS)), n_fillers))]
    think += facts
    if max_fillers and rng.random() < 0.5:
        think += ["let me check the documents again .", *facts]
    think.append(f"so {answer_sentence}" if ex["dataset"] == "musique" else answer_sentence)
    response = [answer_sentence]
    supplement = [docs[i] for i in ex["helpful_doc_idxs"]]
    if supplement and rng.random() >= p_unhelpful:
        # A fixed opener: otherwise greedy decoding prefers the single end-of-sequence token
        # to the many possible first words of the supplement, and never adds it.
        response += ["this is because" if ex["dataset"] == "musique" else "also ,", *supplement]
    return P.join_completion(" ".join(think), " ".join(response))


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batch_step(model: Any, seqs: list[tuple[int, list[int]]], pad_id: int, micro_batches: int) -> float:
    """Accumulate the gradient of the batch's completion-only loss (mean over completion tokens)
    and return that loss. `seqs` holds (prompt length, token ids). The batch is sorted by length
    and cut into `micro_batches` parts, each padded to its own longest sequence only: the same
    gradient as one padded batch, with less padding to compute."""
    import torch
    import torch.nn.functional as F

    order = sorted(seqs, key=lambda x: len(x[1]))
    n_targets = sum(len(s) - p for p, s in order)
    size = -(-len(order) // max(1, micro_batches))
    total = 0.0
    for start in range(0, len(order), size):
        part = order[start:start + size]
        width = max(len(s) for _, s in part)
        input_ids = torch.full((len(part), width), pad_id)  # (b, T)
        labels = torch.full((len(part), width), -100)
        for b, (p, s) in enumerate(part):
            input_ids[b, :len(s)] = torch.tensor(s)
            labels[b, p:len(s)] = torch.tensor(s[p:])
        # Right padding with no attention mask: causal attention never looks right, and
        # SDPA without a mask is much faster on CPU.
        out = model(input_ids=input_ids)
        logits = out.logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                               ignore_index=-100, reduction="sum") / n_targets
        aux = getattr(out, "aux_loss", None)  # MoE router load balancing, weighted by the part's share
        if aux is not None and getattr(model.config, "router_aux_loss_coef", 0):
            loss = loss + model.config.router_aux_loss_coef * aux * len(part) / len(order)
        loss.backward()
        total += loss.item()
    return total


def train_lm(model: Any, tokenizer: Any, examples: list[dict[str, Any]], steps: int, cfg: PretrainDemoConfig,
             p_wrong: float, p_unhelpful: float, max_fillers: int, seed: int, label: str,
             position: int = 0, on_step: Callable[[int, float], None] | None = None) -> list[dict[str, float]]:
    """Completion-only causal-LM training on freshly written traces each step (so filler
    patterns never repeat exactly). Returns the loss curve. `on_step(steps_done, loss)` runs
    after each optimiser step (bench/teacher_copying.py probes the model there)."""
    import torch
    from tqdm import tqdm

    rng = random.Random(seed)
    torch.manual_seed(seed)
    prompt_ids = [tokenizer(P.render(e, tokenizer).text, add_special_tokens=False)["input_ids"] for e in examples]
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for e in examples:
        by_dataset.setdefault(e["dataset"], []).append(e)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    curve: list[dict[str, float]] = []
    bar = tqdm(range(steps), desc=f"pretrain {label}", mininterval=5, position=position)
    ema = None
    for step in bar:
        idx = [rng.randrange(len(examples)) for _ in range(cfg.batch_size)]
        traces = [write_trace(examples[i], rng, by_dataset[examples[i]["dataset"]], p_wrong, p_unhelpful, max_fillers)
                  for i in idx]
        comp = tokenizer(traces, add_special_tokens=False)["input_ids"]
        seqs = [(len(prompt_ids[i]), prompt_ids[i] + c + [tokenizer.eos_token_id]) for i, c in zip(idx, comp)]
        for g in opt.param_groups:
            g["lr"] = _lr(step, steps, cfg.learning_rate, cfg.warmup_steps)
        loss = batch_step(model, seqs, tokenizer.pad_token_id, cfg.micro_batches)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema = loss if ema is None else 0.95 * ema + 0.05 * loss
        # refresh=False: a refresh per step would defeat mininterval (one log line per step in Prefect)
        bar.set_postfix(loss=f"{ema:.3f}", refresh=False)
        if step % 10 == 0 or step == steps - 1:
            curve.append({"step": step, f"{label}_loss": loss})
        if on_step is not None:
            on_step(step + 1, loss)
    model.eval()
    return curve


def corpus_texts(examples: list[dict[str, Any]]) -> list[str]:
    """Every string the models will read or write, for the vocabulary."""
    texts = [P.INSTRUCTION, "documents : question : [ ] so the question is : let me check the documents again .",
             "this is because also ,"]
    texts += list(FILLERS) + [str(i) for i in range(1, 64)]
    for e in examples:
        texts += e["documents"] + e["answers"] + e["bridge"] + [e["question"]] + [t["content"] for t in e["history"]]
    return texts


def _train_one(cfg: PretrainDemoConfig, train: list[dict], out: Path, offset: int) -> tuple[dict[str, Any], list]:
    """Train model `offset` of the plan (0 teacher, 1 student base) and save it with the
    tokenizer already saved in its directory; returns its metrics and loss curve. Runs in a
    worker process when cfg.workers > 1."""
    import torch
    from transformers import AutoTokenizer

    from steps.core import modeling

    torch.set_num_threads(cfg.threads)
    label, arch, steps, p_wrong, p_unhelpful = (
        ("teacher", cfg.teacher_arch, cfg.teacher_steps, cfg.teacher_p_wrong, cfg.teacher_p_unhelpful),
        ("student_base", cfg.student_arch, cfg.student_steps, cfg.student_p_wrong, cfg.student_p_unhelpful))[offset]
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(out / label)
    model = modeling.build_model(arch, len(tokenizer), tokenizer, cfg.seed + offset)
    history = train_lm(model, tokenizer, train, steps, cfg, p_wrong, p_unhelpful, cfg.max_fillers,
                       cfg.seed + 100 + offset, label, position=offset)
    model.save_pretrained(out / label)
    prof = modeling.save_profile(model, out / label)
    return ({f"{label}_params": prof["n_params"], f"{label}_active_params": prof["n_active"],
             f"{label}_train_s": round(time.perf_counter() - t0, 1),
             f"{label}_final_loss": history[-1][f"{label}_loss"]}, history)


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: end this process as soon as its parent is gone. A worker of a killed
    stage would otherwise train on for minutes and then write into the outputs of the stage's
    next run."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def pretrain(cfg: PretrainDemoConfig, train: list[dict], out: Path) -> dict[str, Any]:
    """Train and save both models under `out`; returns metrics. The vocabulary comes from the
    train split only: nothing about the held-out splits reaches a model. Each model's result
    depends only on its own seed, so training them in parallel changes nothing but the time."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from steps.core import modeling

    tokenizer = modeling.build_tokenizer(corpus_texts(train))
    for label in ("teacher", "student_base"):
        tokenizer.save_pretrained(out / label)
    metrics: dict[str, Any] = {"vocab_size": len(tokenizer)}
    train_one = functools.partial(_train_one, cfg, train, out)
    if cfg.workers > 1:
        # spawn: a forked child would inherit torch's thread pool state from the parent.
        with ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_exit_with_parent, initargs=(os.getpid(),)) as pool:
            results = list(pool.map(train_one, (0, 1)))
    else:
        results = [train_one(offset) for offset in (0, 1)]
    history: list[dict[str, float]] = []
    for m, h in results:
        metrics.update(m)
        history += h
    metrics["history"] = history
    return metrics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest")
    ap.add_argument("--out", default="data/pretrain_demo")
    args = ap.parse_args(argv)
    cfg = load_config(PretrainDemoConfig, "pretrain_demo", args.params)
    out = Path(args.out)
    if cfg.teacher_path:
        for p in (cfg.teacher_path, cfg.student_path):
            if not (Path(p) / "config.json").exists():
                raise FileNotFoundError(f"{args.params}: pretrain_demo: {p} is not a model directory (no config.json); "
                                        "models are never downloaded, point at a local copy")
        models = {"teacher": cfg.teacher_path, "student_base": cfg.student_path, "embedded": False}
        metrics: dict[str, Any] = {}
    else:
        train = read_validated(Path(args.data) / "train.jsonl", EXAMPLES)
        metrics = pretrain(cfg, train, out)
        models = {"teacher": str(out / "teacher"), "student_base": str(out / "student_base"), "embedded": True}
    write_json(out / "models.json", models)
    history = metrics.pop("history", [])
    write_json(out / "metrics.json", metrics)
    from steps.core import tracking
    tracking.log_stage("pretrain_demo", cfg, metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                       history=history)
    print(f"pretrain_demo: {models} {metrics}")


if __name__ == "__main__":
    main()
