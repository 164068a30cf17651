"""Capacity plan at the paper's scale: GPUs, memory, time and cost per stage, from the project's
FLOPs convention (steps/core/modeling.py) and assumptions stated here, each marked as such.

    .venv/bin/python -m bench.capacity                       # the markdown table
    .venv/bin/python -m bench.capacity --json                # the same as JSON
    .venv/bin/python -m bench.capacity --set mfu_train=0.25 --set gpu=h200

Nothing here was measured on a GPU: every throughput is FLOPs / (peak x MFU), and MFU is an
assumption (the number to replace first, with a measured one, when GPUs are available).
Three kinds of inputs:
  given      the scale the plan is for (the paper's models and data, the sample stage's k)
  assumed    throughput, prices, token counts the data does not fix, kept fractions
  derived    everything in the table, from the two above and the FLOPs convention
Training FLOPs are 3x the forward pass (forward + backward = 6 N per token, the usual
convention), plus the convention's attention term, also x3.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from steps.core.modeling import decode_flops, prefill_flops

GPUS = {  # dense bf16 peak FLOP/s (no sparsity), memory in GB: the vendors' data sheets
    "h100": {"peak_flops": 989e12, "memory_gb": 80.0},
    "h200": {"peak_flops": 989e12, "memory_gb": 141.0},
}


@dataclass(frozen=True)
class Plan:
    # --- given: the paper's scale ---
    student_params: float = 30.5e9        # a 30B-A3B MoE (Qwen3-30B-A3B's shape)
    student_active: float = 3.3e9         # N_active: top-8 of 128 experts, attention, output projection
    student_layers: int = 48
    student_d_attn: int = 4096            # 32 heads x 128
    student_kv_bytes_per_token: int = 2 * 48 * 4 * 128 * 2  # K and V, 48 layers, 4 KV heads x 128, bf16
    teacher_params: float = 670e9         # behind an API: no GPUs of ours
    questions: int = 40_000               # MuSiQue ~20k train + an e-commerce set of similar size
    k_candidates: int = 4                 # the sample stage's k
    candidate_tokens: int = 1_000         # ~1k tokens per candidate
    # --- assumed: token counts and fractions the data does not fix ---
    prompt_tokens: int = 2_500            # question + ~20 paragraphs (MuSiQue) after the prompt budget
    judge_output_tokens: int = 200        # an LLM judge's JSON verdict with its rationale
    kept_fraction: float = 0.5            # candidates the judge keeps (correct and helpful) for RFT
    rft_epochs: int = 2
    grpo_steps: int = 500
    grpo_prompts_per_step: int = 64
    grpo_generations: int = 8             # K per prompt
    grpo_completion_tokens: int = 1_000   # before GRPO shortens them: the plan's upper end
    eval_questions: int = 4_400           # MuSiQue dev (2.4k answerable) + an e-commerce eval set
    # --- assumed: throughput (the first numbers to replace with measured ones) ---
    gpu: str = "h100"
    mfu_train: float = 0.15               # MoE training with ZeRO-3: routing and all-to-all cost MFU
    mfu_decode: float = 0.04              # vLLM decode is memory-bound: a few % of peak FLOP/s
    mfu_prefill: float = 0.40
    optimizer_bytes_per_param: int = 16   # bf16 weights + bf16 grads + fp32 master + Adam m, v
    activation_gb_per_gpu: float = 10.0   # activation checkpointing on, micro-batch 1 x 4k tokens
    memory_headroom: float = 0.9          # use at most this share of a GPU's memory
    gpus_per_node: int = 8
    api_tokens_per_s_per_stream: float = 30.0  # a hosted 670B reasoning model, per request
    api_concurrency: int = 256
    # --- assumed: prices (list prices vary; set yours) ---
    gpu_hour_usd: float = 2.50            # an on-demand H100 (H200: set it, e.g. 3.50)
    api_input_usd_per_m: float = 0.55     # a hosted 670B MoE reasoning model's list price
    api_output_usd_per_m: float = 2.19

    def __post_init__(self) -> None:
        if self.gpu not in GPUS:
            raise ValueError(f"gpu {self.gpu!r}: expected one of {sorted(GPUS)}")
        for name in ("mfu_train", "mfu_decode", "mfu_prefill", "kept_fraction", "memory_headroom"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a fraction in (0, 1], got {getattr(self, name)}")


def student_profile(p: Plan) -> dict[str, int]:
    """The FLOPs profile (steps/core/modeling.py) of the student at the plan's scale."""
    return {"n_active": int(p.student_active), "n_layer": p.student_layers, "d_attn": p.student_d_attn,
            "n_params": int(p.student_params)}


def train_flops(p: Plan, sequences: float, prompt: int, completion: int) -> float:
    """Forward + backward (3x the forward FLOPs) over whole sequences."""
    prof = student_profile(p)
    return 3.0 * sequences * prefill_flops(prof, prompt + completion)


def rollout_flops(p: Plan, sequences: float, prompt: int, completion: int) -> tuple[float, float]:
    """(prefill, decode) FLOPs of generating `completion` tokens after `prompt`, per the convention."""
    prof = student_profile(p)
    return sequences * prefill_flops(prof, prompt), sequences * decode_flops(prof, prompt, completion)


def zero3_gpus(p: Plan) -> tuple[int, float]:
    """The fewest GPUs (whole nodes) whose share of the sharded training state fits; GB per GPU."""
    mem = GPUS[p.gpu]["memory_gb"] * p.memory_headroom
    state_gb = p.student_params * p.optimizer_bytes_per_param / 1e9
    n = p.gpus_per_node
    while state_gb / n + p.activation_gb_per_gpu > mem:
        n += p.gpus_per_node
    return n, state_gb / n + p.activation_gb_per_gpu


def serve_gpus(p: Plan, concurrent: int, context: int) -> tuple[int, float]:
    """Tensor-parallel degree (1, 2, 4, 8) whose memory holds the bf16 weights and the KV cache
    of `concurrent` sequences of `context` tokens; GB per GPU."""
    weights_gb = p.student_params * 2 / 1e9
    kv_gb = concurrent * context * p.student_kv_bytes_per_token / 1e9
    mem = GPUS[p.gpu]["memory_gb"] * p.memory_headroom
    for tp in (1, 2, 4, 8):
        if (weights_gb + kv_gb) / tp <= mem:
            return tp, (weights_gb + kv_gb) / tp
    raise ValueError(f"{concurrent} sequences of {context} tokens do not fit 8 GPUs: lower the batch")


def _gpu_row(p: Plan, stage: str, flops_by_mfu: list[tuple[float, float]], gpus: int, mem_gb: float,
             config: str) -> dict[str, Any]:
    peak = GPUS[p.gpu]["peak_flops"]
    gpu_s = sum(f / (peak * mfu) for f, mfu in flops_by_mfu)
    gpu_h = gpu_s / 3600
    return {"stage": stage, "gpus": f"{gpus} x {p.gpu.upper()}", "gb_per_gpu": round(mem_gb, 1),
            "hours": round(gpu_h / gpus, 2), "gpu_hours": round(gpu_h, 1), "usd": round(gpu_h * p.gpu_hour_usd),
            "pflop": round(sum(f for f, _ in flops_by_mfu) / 1e15, 1), "config": config}


def _api_row(p: Plan, stage: str, requests: float, prompt: int, output: int, config: str) -> dict[str, Any]:
    out_tokens, in_tokens = requests * output, requests * prompt
    hours = out_tokens / (p.api_tokens_per_s_per_stream * p.api_concurrency) / 3600
    usd = in_tokens / 1e6 * p.api_input_usd_per_m + out_tokens / 1e6 * p.api_output_usd_per_m
    return {"stage": stage, "gpus": "API (teacher)", "gb_per_gpu": None, "hours": round(hours, 2), "gpu_hours": 0.0,
            "usd": round(usd), "pflop": None, "config": config}


def plan_rows(p: Plan) -> list[dict[str, Any]]:
    candidates = p.questions * p.k_candidates
    kept = candidates * p.kept_fraction
    rows = [{"stage": "ingest, report, export, promote", "gpus": "0 (CPU)", "gb_per_gpu": None, "hours": 0.5,
             "gpu_hours": 0.0, "usd": 0, "pflop": None, "config": "livethinking-k8s-light (2 CPU, 8 GiB)"},
            _api_row(p, "sample (teacher, k candidates)", candidates, p.prompt_tokens, p.candidate_tokens,
                     f"OpenAI back end, concurrency {p.api_concurrency}; livethinking-k8s-light (no GPU)"),
            _api_row(p, "judge (LLM judge)", candidates, p.prompt_tokens + p.candidate_tokens, p.judge_output_tokens,
                     "LLM judge on the API (the rule judge: CPU, minutes); livethinking-k8s-light")]
    n_train, mem_train = zero3_gpus(p)
    rft = train_flops(p, kept * p.rft_epochs, p.prompt_tokens, p.candidate_tokens)
    rows.append(_gpu_row(p, f"rft ({kept:,.0f} kept x {p.rft_epochs} epochs)", [(rft, p.mfu_train)], n_train,
                         mem_train, f"ZeRO-3 / FSDP full shard (DDP: {p.student_params * 16 / 1e9:.0f} GB per "
                                    f"replica does not fit); livethinking-k8s-train, gpu_count {n_train}"))
    seqs = p.grpo_steps * p.grpo_prompts_per_step * p.grpo_generations
    pre, dec = rollout_flops(p, seqs, p.prompt_tokens, p.grpo_completion_tokens)
    tp, mem_serve = serve_gpus(p, p.grpo_prompts_per_step * p.grpo_generations,
                               p.prompt_tokens + p.grpo_completion_tokens)
    upd = train_flops(p, seqs, p.prompt_tokens, p.grpo_completion_tokens)
    roll = _gpu_row(p, "grpo", [(pre, p.mfu_prefill), (dec, p.mfu_decode)], tp, mem_serve, "")
    train = _gpu_row(p, "grpo", [(upd, p.mfu_train)], n_train, mem_train, "")
    # TRL's server mode is synchronous: the server idles while the policy updates and the other
    # way round, so both sets of GPUs are held for the sum of the two times.
    hours = roll["hours"] + train["hours"]
    held = tp + n_train
    rows.append({"stage": f"grpo ({seqs:,} completions; rollouts {roll['hours']} h, updates {train['hours']} h)",
                 "gpus": f"{n_train} + {tp} x {p.gpu.upper()}", "gb_per_gpu": max(mem_train, round(mem_serve, 1)),
                 "hours": round(hours, 2), "gpu_hours": round(held * hours, 1),
                 "usd": round(held * hours * p.gpu_hour_usd), "pflop": round(roll["pflop"] + train["pflop"], 1),
                 "config": f"updates: ZeRO-3 / FSDP full shard, livethinking-k8s-train (gpu_count {n_train}); "
                           f"rollouts: trl vllm-serve, tensor parallel {tp} (grpo.vllm.mode: server), "
                           f"livethinking-k8s-vllm (gpu_count {tp})"})
    e_pre, e_dec = rollout_flops(p, p.eval_questions, p.prompt_tokens, p.candidate_tokens)
    tp_e, mem_e = serve_gpus(p, 256, p.prompt_tokens + p.candidate_tokens)
    rows.append(_gpu_row(p, "evaluate (student, per model row)", [(e_pre, p.mfu_prefill), (e_dec, p.mfu_decode)],
                         tp_e, mem_e, f"vLLM back end, tensor parallel {tp_e}; livethinking-k8s-vllm"))
    rows.append(_api_row(p, "evaluate (teacher row)", p.eval_questions, p.prompt_tokens, p.candidate_tokens,
                         "OpenAI back end; livethinking-k8s-light"))
    return rows


def markdown(p: Plan, rows: list[dict[str, Any]]) -> str:
    head = "| stage | GPUs | GB/GPU | hours | GPU-hours | USD | PFLOP | config |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {r['stage']} | {r['gpus']} | {r['gb_per_gpu'] if r['gb_per_gpu'] is not None else '-'} | "
                   f"{r['hours']} | {r['gpu_hours']} | {r['usd']:,} | {r['pflop'] if r['pflop'] is not None else '-'} "
                   f"| {r['config']} |\n" for r in rows)
    total = (f"| **total** | | | {sum(r['hours'] for r in rows):.1f} | {sum(r['gpu_hours'] for r in rows):.1f} | "
             f"{sum(r['usd'] for r in rows):,} | | hours: the stages one after another |\n")
    return head + body + total


def _parse_set(items: list[str]) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(Plan)}
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise SystemExit(f"--set {item!r}: expected key=value with key one of {sorted(types)}")
        kind = {"int": int, "float": float, "str": str}[str(types[key])]
        out[key] = kind(float(value)) if kind is int else kind(value)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", action="append", default=[], help="replace an assumption: key=value (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    plan = Plan(**_parse_set(args.set))
    rows = plan_rows(plan)
    if args.json:
        print(json.dumps({"plan": dataclasses.asdict(plan), "rows": rows}, indent=2))
    else:
        print(markdown(plan, rows))
        print(f"Implied throughput: decode {student_decode_tps(plan):,.0f} tokens/s per GPU, "
              f"training {student_train_tps(plan):,.0f} tokens/s per GPU ({plan.gpu.upper()}).")
    return 0


def student_decode_tps(p: Plan) -> float:
    """Decode tokens/s per GPU the MFU assumption implies, at the plan's mean GRPO context."""
    per_token = decode_flops(student_profile(p), p.prompt_tokens, p.grpo_completion_tokens) / p.grpo_completion_tokens
    return GPUS[p.gpu]["peak_flops"] * p.mfu_decode / per_token


def student_train_tps(p: Plan) -> float:
    per_token = train_flops(p, 1, p.prompt_tokens, p.candidate_tokens) / (p.prompt_tokens + p.candidate_tokens)
    return GPUS[p.gpu]["peak_flops"] * p.mfu_train / per_token


if __name__ == "__main__":
    raise SystemExit(main())
