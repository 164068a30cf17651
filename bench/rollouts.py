"""Benchmark: GRPO rollout decoding, side by side on one model and one set of prompts.

    .venv/bin/python -m bench.rollouts [--repeats 3] [--profiles default,long_tail] [--engines ...]
    .venv/bin/python -m bench.rollouts --model data/rft/model --data data/ingest/train.jsonl   # a trained policy

What is compared, on the same batch (params grpo: 4 prompts x 8 completions, temperature 1.0,
max_completion_length 160):

- `generate`: the current path, transformers' `model.generate` through our transformers back end
  (steps.core.rl.rollout_func's default, `engine: generate`);
- `trl`: TRL's own generation (GRPOTrainer without a rollout_func: `_generate_single_turn`,
  `model.generate` with TRL's generation config);
- `trl_cb`: TRL with `use_transformers_continuous_batching` (transformers' `generate_batch`);
- `fast`: steps.core.engine (`engine: fast`): finished rows leave the batch;
- `fast_spec`: the same with speculative decoding (`speculative: {draft_tokens: K, max_batch: M}`),
  prompt-lookup drafts verified by the policy in one pass (exact: greedy identical, sampled
  distributed as the policy's); its lines add the mean accepted drafts per row and pass;
- `fast_eagle`: the same with TLT's drafter (steps.core.drafter: an EAGLE-style block on the
  policy's features, trained on what the warm-up rollouts recorded, `init_steps`, then
  `--eagle-train-steps` more after each rollout, counted in its time, as between RL steps) and
  the draft depth picked by the bandit (`depth: bandit`). `--eagle-warmup` full rollouts come first,
  untimed, on other prompts (with `--model`, the rows after the timed ones), as the RL steps before
  the measured one: the drafter and the bandit at steady state, as in a GRPO run after its first
  steps, without having seen the timed prompts;
- `fast_compiled`, `fast_eagle_compiled`: `fast` and `fast_eagle` with `compile: true` (the decode
  pass through `torch.compile(dynamic=True)`, steps.core.engine.compiled_pass); the untimed
  warm-up rollouts carry the compiling, which bench.compile_pass times on its own.

The policy is the embedded default's student shape (params.yaml pretrain_demo.student_arch),
untrained, with the example tokenizer. An untrained model almost never ends a completion, so
its length distribution is imposed: a hook on the output layer sets the end-of-sequence
probability at generated position t to the hazard of a target distribution (p(t) / P(L >= t)),
the same for every path (the prompts are cut to one token length, so t is the position less
that length). Profiles: `default`, lengths uniform on 40..143 (the embedded default's first GRPO
step: mean 80, min 40, max 143, data/grpo/train_log.csv); `long_tail`, 80% uniform on 8..40 and
20% running to the budget (a few long completions holding the batch). With `--model` (a
trained policy, e.g. data/rft/model, the GRPO stage's starting point) the profile is `trained`:
the model's own lengths on the rendered `--data` prompts, no hook.

Prints one JSON line per (profile, engine) and a last line with the ratios (tokens/s of each
path over `generate` and over `trl`), measured in the same run. Tokens are the generated ones,
end-of-sequence excluded; seconds the median of `--repeats` after one warm-up, wall clock and
the process's CPU time (`cpu_*`: on a machine shared with other jobs the wall clock also counts
the time the process waited for a core; with one thread the CPU time does not). The timed runs go
round robin (round r: one rollout of each path, seed r), so a slow stretch of a shared machine
falls on every path alike; the headline ratios come twice, as the ratio of the medians and as the
median of each round's ratio (`..._rounds`).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENGINES = ("generate", "trl", "trl_cb", "fast", "fast_spec", "fast_eagle", "fast_compiled", "fast_eagle_compiled")


def length_pmf(profile: str, budget: int) -> list[float]:
    """p[L] for L = 0..budget (p[budget]: the mass that runs to the budget)."""
    p = [0.0] * (budget + 1)
    def uniform(lo: int, hi: int, mass: float) -> None:
        for L in range(lo, min(hi, budget) + 1):
            p[L] += mass / (min(hi, budget) - lo + 1)
    if profile == "default":
        uniform(40, 143, 1.0)
    elif profile == "long_tail":
        uniform(8, 40, 0.8)
        p[budget] += 0.2
    else:
        raise ValueError(f"unknown profile {profile!r}: default | long_tail")
    return p


def hazard(pmf: list[float]) -> list[float]:
    """h[t]: the probability of ending at generated position t given no end before it."""
    out, left = [], 1.0
    for pt in pmf[:-1]:
        out.append(min(1.0, pt / left) if left > 1e-12 else 1.0)
        left -= pt
    return out


class LengthHook:
    """Sets the end-of-sequence logit so that its probability (temperature 1, no top-p/top-k) is
    h[position - prompt_len]; the position comes from the model's own `position_ids`, which every
    path passes (model.generate derives them from the mask, the engine and generate_batch pass
    them)."""

    def __init__(self, model: Any, eos: int, prompt_len: int, h: list[float]):
        import torch

        self.eos, self.prompt_len = eos, prompt_len
        h_t = torch.tensor(h + [0.0], dtype=torch.float32)
        self.log_odds = torch.log(h_t) - torch.log1p(-h_t.clamp(max=1 - 1e-7))  # -inf where h = 0
        self.pos = None
        model.register_forward_pre_hook(self._positions, with_kwargs=True)
        model.get_output_embeddings().register_forward_hook(self._logits)

    def _positions(self, module, args, kwargs):
        self.pos = kwargs.get("position_ids")
        if self.pos is None:
            raise RuntimeError("bench.rollouts: a path called the model without position_ids; the length hook needs them")

    def _logits(self, module, args, out):
        import torch

        pos = self.pos[..., -out.shape[-2]:] if self.pos.shape[-1] >= out.shape[-2] else self.pos
        t = (pos - self.prompt_len).clamp(min=0, max=len(self.log_odds) - 1)
        bias = self.log_odds.to(out.device)[t].expand(out.shape[:-1])  # (B, T)
        others = out.float().clone()
        others[..., self.eos] = float("-inf")
        out = out.clone()
        out[..., self.eos] = (torch.logsumexp(others, -1) + bias).to(out.dtype)
        return out


def build_policy(tmp: Path, model_dir: str | None, data: str | None, n_prompts: int) -> tuple[Any, Any, list[str], bool]:
    """(model, tokenizer, prompt texts, imposed lengths?)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.core import training
    from tests.helpers import examples, tiny_model

    if model_dir:
        rows = [json.loads(line) for line in Path(data).read_text().splitlines()[:n_prompts]]
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        return model, tok, [r["prompt"] for r in training.prompt_rows(rows, tok)], False
    arch = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain_demo"]["student_arch"]
    rows = examples(n_prompts, n_prompts)
    path = tiny_model(tmp / "student", arch, rows)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = [tok(p["prompt"], add_special_tokens=False)["input_ids"] for p in training.prompt_rows(rows, tok)]
    cut = min(len(i) for i in ids)
    # One prompt length, so that the length hook knows the generated position from the position id.
    return model, tok, [tok.decode(i[-cut:]) for i in ids[:n_prompts]], True


def trl_trainer(model: Any, tok: Any, tmp: Path, args: argparse.Namespace, cb: bool) -> Any:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    batch = args.prompts * args.k
    cfg = GRPOConfig(output_dir=str(tmp / ("trl_cb" if cb else "trl")), per_device_train_batch_size=batch,
                     num_generations=args.k, generation_batch_size=batch, max_completion_length=args.max_new_tokens,
                     temperature=1.0, report_to=[], use_cpu=True, use_transformers_continuous_batching=cb,
                     # By default its paged cache takes a share of free memory (on a CPU, of the RAM:
                     # 12 GB seen here); 128 pages of 256 tokens hold the batch's 32 x ~560 tokens.
                     transformers_continuous_batching_config={"num_blocks": 128, "max_batch_tokens": 16384} if cb else None,
                     logging_steps=1, save_strategy="no")
    return GRPOTrainer(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)], args=cfg,
                       train_dataset=Dataset.from_list([{"prompt": "x"}]), processing_class=tok)


STATS: dict[str, int] = {}  # the engine's counters, summed over the timed runs


def init_sequences(tok: Any, args: argparse.Namespace) -> list[list[int]]:
    """TLT's initialisation from the RFT data: prompt + kept completion token ids of up to
    `--eagle-init-rows` judge-kept candidates, leaving out the timed prompts' examples."""
    from steps.core.drafter import rft_sequences
    from steps.core.io import read_jsonl

    timed = frozenset(e["id"] for e in read_jsonl(args.data)[: args.prompts])
    return rft_sequences(args.eagle_init_data, args.data, tok, args.eagle_init_rows, exclude=timed)


def runner(engine: str, model: Any, tok: Any, tmp: Path, args: argparse.Namespace):
    """A function: prompt texts (each already repeated k times) -> completion lengths."""
    from steps.core.backends import SamplingParams, TransformersBackend
    from steps.core.prompts import Prompt

    compiled = engine.endswith("_compiled")
    engine = engine.removesuffix("_compiled")
    if engine in ("generate", "fast", "fast_spec", "fast_eagle"):
        from steps.core.drafter import SpecState
        from steps.core.engine import SpecConfig

        spec = {"draft_tokens": args.draft_tokens, "max_batch": args.spec_max_batch} if engine != "fast_eagle" else {
            "drafter": "eagle", "depth": "bandit", "draft_tokens": args.draft_tokens,
            "max_batch": args.spec_max_batch, "train_steps": args.eagle_train_steps}
        state = SpecState(SpecConfig(**spec), model.get_output_embeddings().in_features) if engine == "fast_eagle" else None
        if state is not None and args.eagle_init_data:
            t0 = time.perf_counter()
            fit = state.warm_start(model, init_sequences(tok, args))
            print(json.dumps({"engine": engine, "warm_start_s": round(time.perf_counter() - t0, 1),
                              **{k: round(v, 3) for k, v in fit.items()}}), flush=True)
        backend = TransformersBackend("policy", model_obj=model, tokenizer_obj=tok, batch_size=args.prompts * args.k,
                                      engine="fast" if engine.startswith("fast") else engine,
                                      speculative=spec if engine in ("fast_spec", "fast_eagle") else None,
                                      spec_state=state, compile=compiled)

        def run(texts: list[str], seed: int) -> list[int]:
            ps = [Prompt(messages=(), text=t, key=f"{seed}/{i}") for i, t in enumerate(texts)]
            outs = backend.generate(ps, SamplingParams(n=1, temperature=1.0, max_new_tokens=args.max_new_tokens,
                                                       seed=seed))
            if state is not None:  # the drafter's training between steps is part of the cost
                state.after_rollout(model)
            for key, v in getattr(backend, "last_stats", {}).items():
                STATS[key] = STATS.get(key, 0) + v
            return [cs[0].completion_tokens for cs in outs]
        return run
    # A copy of its own: TRL's continuous-batching path casts the policy to bf16 in place (its
    # `bf16` default) and leaves it in train mode, which would carry over to every path after it.
    trainer = trl_trainer(copy.deepcopy(model), tok, tmp, args, cb=engine == "trl_cb")
    eos = set(trainer.eos_token_ids) if hasattr(trainer, "eos_token_ids") else {tok.eos_token_id}

    def run(texts: list[str], seed: int) -> list[int]:
        import torch

        torch.manual_seed(seed)
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        completion_ids, _ = trainer._generate_single_turn(ids, None, {}, args.k)
        return [len(c) - (1 if c and c[-1] in eos else 0) for c in completion_ids]
    return run


def report_error(profile: str, engine: str, e: Exception) -> None:
    print(json.dumps({"profile": profile, "engine": engine, "error": f"{type(e).__name__}: {e}"[:400]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help="prompts per step (params grpo.prompts_per_step)")
    ap.add_argument("--k", type=int, default=8, help="completions per prompt (grpo.num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="grpo.max_completion_length")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profiles", default="default,long_tail")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--draft-tokens", type=int, default=4, help="fast_spec: tokens proposed per verification")
    ap.add_argument("--spec-max-batch", type=int, default=32, help="fast_spec: speculate while at most this many rows run")
    ap.add_argument("--eagle-train-steps", type=int, default=10, help="fast_eagle: drafter steps after each rollout")
    ap.add_argument("--eagle-warmup", type=int, default=10, help="fast_eagle: untimed rollouts (RL steps) first")
    ap.add_argument("--eagle-init-data", help="fast_eagle: judge-kept candidates (data/judge/kept.jsonl) the drafter "
                                              "is first trained on, as TLT initialises it from the RFT data")
    ap.add_argument("--eagle-init-rows", type=int, default=512)
    ap.add_argument("--model", help="a trained policy directory (then the profile is its own: `trained`)")
    ap.add_argument("--data", help="with --model: a JSONL of example rows (data/ingest/train.jsonl)")
    args = ap.parse_args()
    if args.model and not args.data:
        ap.error("--model needs --data (the example rows whose prompts are rendered)")

    import torch

    torch.set_num_threads(args.threads)
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        ap.error(f"--engines: unknown {sorted(unknown)}; known: {list(ENGINES)}")
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        profiles = ["trained"] if args.model else args.profiles.split(",")
        for profile in profiles:
            # With a trained policy, the drafter's warm-up rollouts take other prompts than the
            # timed ones (the rows after them), as RL steps do: a drafter that has seen the timed
            # prompts' continuations would be kept more often than in training.
            extra = args.prompts * args.eagle_warmup if args.model else 0
            model, tok, prompts, imposed = build_policy(tmp / profile, args.model, args.data, args.prompts + extra)
            prompts, warm_prompts = prompts[:args.prompts], prompts[args.prompts:]
            model.config.output_router_logits = False
            if imposed:
                LengthHook(model, tok.eos_token_id, len(tok(prompts[0], add_special_tokens=False)["input_ids"]),
                           hazard(length_pmf(profile, args.max_new_tokens)))
            texts = [p for p in prompts for _ in range(args.k)]
            runs = {}
            for engine in engines:
                kind = engine.removesuffix("_compiled")  # the engine a compiled variant runs
                try:
                    run = runner(engine, model, tok, tmp, args)
                    model.eval()
                    run(texts[: args.k], seed=999)  # warm-up
                    if kind == "fast_eagle":
                        for w in range(args.eagle_warmup):
                            chunk = warm_prompts[w * args.prompts:(w + 1) * args.prompts] or prompts
                            run([p for p in chunk for _ in range(args.k)], seed=1000 + w)
                    runs[engine] = run
                except Exception as e:  # a path that does not run here is reported, not hidden
                    report_error(profile, engine, e)
            # Round robin: each round times one rollout of every path, so a stretch in which the
            # shared machine runs slower slows every path alike instead of the one timed then.
            timed = {e: {"times": [], "cpu": [], "lengths": [], "tokens": [], "stats": {}} for e in runs}
            for r in range(args.repeats):
                for engine, run in list(runs.items()):
                    STATS.clear()
                    t0, c0 = time.perf_counter(), time.process_time()
                    try:
                        lens = run(texts, seed=r)
                    except Exception as e:
                        report_error(profile, engine, e)
                        del runs[engine], timed[engine]
                        continue
                    got = timed[engine]
                    got["times"].append(time.perf_counter() - t0)
                    got["cpu"].append(time.process_time() - c0)
                    got["lengths"].extend(lens)
                    got["tokens"].append(sum(lens))
                    for key, v in STATS.items():
                        got["stats"][key] = got["stats"].get(key, 0) + v
            for engine, got in timed.items():
                kind = engine.removesuffix("_compiled")
                times, cpu, lengths, stats = got["times"], got["cpu"], sorted(got["lengths"]), got["stats"]
                sec, cpu_sec = statistics.median(times), statistics.median(cpu)
                tokens = statistics.mean(got["tokens"])
                line = {"profile": profile, "engine": engine, "rows": len(texts), "tokens_per_s": round(tokens / sec, 1),
                        "cpu_tokens_per_s": round(tokens / cpu_sec, 1),
                        "seconds_median": round(sec, 3), "seconds": [round(t, 3) for t in times],
                        "cpu_seconds": [round(t, 3) for t in cpu],
                        "tokens_per_run": tokens, "tokens": got["tokens"], "length_mean": round(statistics.mean(lengths), 1),
                        "length_p50": lengths[len(lengths) // 2], "length_p90": lengths[int(len(lengths) * 0.9)],
                        "length_max": lengths[-1], "length_min": lengths[0]}
                if kind in ("fast_spec", "fast_eagle") and stats.get("verify_row_passes"):
                    line.update(accepted_per_row_pass=round(stats["accepted"] / stats["verify_row_passes"], 3),
                                forward_passes_per_run=stats["forward_passes"] / args.repeats,
                                draft_tokens=args.draft_tokens, spec_max_batch=args.spec_max_batch)
                results.setdefault(profile, {})[engine] = line
                print(json.dumps(line), flush=True)
    ratios, cpu_ratios = {}, {}
    for profile, by in results.items():
        for engine, line in by.items():
            for base in ("generate", "trl"):
                if base in by and engine != base:
                    ratios[f"{profile}/{engine}_vs_{base}"] = round(line["tokens_per_s"] / by[base]["tokens_per_s"], 2)
                    cpu_ratios[f"{profile}/{engine}_vs_{base}"] = round(
                        line["cpu_tokens_per_s"] / by[base]["cpu_tokens_per_s"], 2)
    headline = {}  # the figures: the online drafter's tokens/s over TRL's two paths
    for profile, by in results.items():
        for base, key in (("trl", "rollout_speedup"), ("trl_cb", "rollout_speedup_vs_cb")):
            for ours, suffix in (("fast_eagle", ""), ("fast_eagle_compiled", "_compiled")):
                if ours in by and base in by:
                    headline[f"{profile}/{key}{suffix}"] = round(by[ours]["tokens_per_s"] / by[base]["tokens_per_s"], 2)
                    # Each round's ratio of tokens/s, then their median: the figure least moved by
                    # the machine's drift (the two were timed next to each other in every round).
                    per_round = [(by[ours]["tokens"][r] / by[ours]["seconds"][r])
                                 / (by[base]["tokens"][r] / by[base]["seconds"][r])
                                 for r in range(min(len(by[base]["seconds"]), len(by[ours]["seconds"])))]
                    headline[f"{profile}/{key}{suffix}_rounds"] = round(statistics.median(per_round), 2)
    print(json.dumps({**headline, "ratios_tokens_per_s": ratios, "ratios_cpu_tokens_per_s": cpu_ratios, "threads": args.threads, "repeats": args.repeats,
                      "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
