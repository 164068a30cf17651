"""One RL trainer for every RL method: TRL's GRPOTrainer with the hooks the methods need.

An RL stage is its config (a subclass of `RLConfig`), its rewards (steps.core.rewards, by name
in params) and its rollout (steps.core.rollouts, by protocol name); `train_rl` does the rest:

- **Rollouts** go through TRL's `rollout_func`: the stage's rollout decodes the live policy
  (`engine`: transformers' `model.generate`, or steps.core.engine, whose finished rows leave the
  batch), and its ownership mask becomes TRL's `env_mask`, so inserted tokens (a teacher's, a routed model's)
  carry no loss and are not counted in `completions/mean_length`; the rewards get `policy_tokens`
  for the same reason. The end-of-sequence token of a finished completion is part of the
  completion (the policy must learn to stop), as in TRL's own generation. A rollout may hand
  the rewards per-completion columns of its own (`meta["reward_columns"]`, e.g. AdaptThink's
  `forced_nothinking`); they reach the reward functions as dataset columns do.
- **Rollout statistics**: the means of each step's numeric per-completion meta (a router's
  calls per member, a relay's teacher tokens, AdaptThink's forced no-thinking share, ...) are
  logged beside the rewards as `rollout/<key>` columns of train_log.csv.
- **Rewards** are added as Σ wᵢ·rᵢ (TRL's `reward_weights`), from the registry.
- **Advantages** (`advantage`): `group` z-score over the K completions of a prompt (GRPO, the
  LiveThinking paper), `batch` (group mean removed, divided by the batch's std: DLER's batch-level
  normalisation), `none` (group mean removed, no scaling: Dr. GRPO), or `raw` (the reward itself
  is the advantage: AdaptThink's "no group normalisation").
- **Old log-probs**: a stage may override the old log-probability of chosen tokens
  (`old_logp_override(inputs) -> (B, T) tensor, NaN where not overridden`; AdaptThink sets the
  forced first token's to log 0.5). TRL computes old log-probs only when a generation batch is
  reused (`num_iterations > 1` or `steps_per_generation > 1`); otherwise the ratio is exactly 1
  and the clip (`epsilon`, `epsilon_high`) never acts — the loss is then the plain policy
  gradient with advantages. The override forces the computation.
- **Rollouts on a vLLM server** (`vllm: {mode: server, ...}`, GPU machines only): TRL's server
  mode (GRPOConfig `use_vllm`, `vllm_mode: server`) with `trl vllm-serve` on GPUs of its own. TRL
  pushes the live weights to the server (NCCL) before each rollout; with a `rollout_func` it does
  not generate itself, so the stage's rollout decodes through the server (`TRLServerBackend`,
  TRL's own client) instead of in-process. Only rollouts that need nothing but generation can
  (plain, think, no_think); one that drives the in-process model (relay, router) is refused with
  the reason. Without CUDA the setting is refused before anything starts (`vllm_grpo_args`).
- **Importance sampling level** (`importance_sampling_level`): the ratio per token (`token`,
  GRPO's), or one per sequence from the mean per-token log-ratio (`sequence`, as AdaptThink's
  reference computes it).
- **Scale-out** (`launcher`, steps/core/launch.py): the stage runs under `accelerate launch`
  (DDP, FSDP, DeepSpeed ZeRO). A step's prompts_per_step x num_generations completions are
  split over the processes; each decodes its share with the live policy unwrapped as TRL's
  own generation does (ZeRO-3 parameters gathered, FSDP1 parameters summoned), and a
  completion's seed comes from its global index, so one process or several draw the same ones.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from steps.core import launch, training
from steps.core.training import finish_stage  # noqa: F401  (every RL stage imports it from here)
from steps.core.config import help_field
from steps.core.rewards import check_spec, make_rewards


@dataclass(frozen=True)
class VLLMServerConfig:
    """Where rollouts are decoded when not in-process: a `trl vllm-serve` server (TRL's server mode)."""
    mode: Literal["off", "server"] = help_field("off", "off: in-process transformers; server: a trl vllm-serve")
    host: str = help_field("127.0.0.1", "the server's host (ignored when base_url is set)")
    port: int = help_field(8000, "the server's HTTP port (trl vllm-serve --port)", ge=1, le=65535)
    base_url: str | None = help_field(None, "e.g. http://vllm-rollouts:8000 (replaces host and port)")
    group_port: int = help_field(51216, "the NCCL port weights are pushed over (trl vllm-serve's default)",
                                 ge=1, le=65535)
    timeout_s: float = help_field(240.0, "how long to wait for the server at start", gt=0.0)


# Rollout protocols that decode through the back end's generate() alone, so a server can do it.
SERVER_PROTOCOLS = ("plain", "think", "no_think")


@dataclass(frozen=True)
class RLConfig:
    """What every RL stage shares; a stage subclasses it and adds its own fields."""
    rewards: dict = field(default_factory=dict, metadata={"help": "reward name -> {weight, options} "
                                                                  "(python -m steps.core.rewards list)"})
    protocol: str = help_field("plain", "the rollout that decodes the policy in training (steps.core.rollouts)")
    protocol_options: dict = field(default_factory=dict, metadata={"help": "passed to the rollout"})
    num_generations: int = help_field(8, "K: completions per prompt (the group)", ge=2)
    prompts_per_step: int = help_field(4, "prompts per optimiser step (x K completions)", ge=1)
    max_steps: int = help_field(100, "optimiser steps", ge=1)
    max_prompts: int = help_field(512, "training prompts drawn from the train split", ge=1)
    learning_rate: float = help_field(2e-4, "peak learning rate", gt=0.0)
    warmup_ratio: float = help_field(0.05, "share of steps spent warming up", ge=0.0, le=1.0)
    beta: float = help_field(0.0, "KL coefficient (0: no reference model)", ge=0.0)
    epsilon: float = help_field(0.2, "lower clip of the ratio (acts only when a batch is reused: see num_iterations)",
                                ge=0.0)
    epsilon_high: float | None = help_field(None, "upper clip (null: = epsilon; DLER raises it)", ge=0.0)
    num_iterations: int = help_field(1, "optimisation passes over each generation batch (>1 makes the ratio and "
                                        "its clip act)", ge=1)
    importance_sampling_level: Literal["token", "sequence"] = help_field(
        "token", "the clipped ratio per token, or per sequence (mean log-ratio: AdaptThink's reference)")
    advantage: Literal["group", "batch", "none", "raw"] = help_field("group", "advantage normalisation (module "
                                                                             "docstring)")
    loss_type: str = help_field("grpo", "TRL loss type (grpo: per-sequence mean, as in the GRPO paper)")
    temperature: float = help_field(1.0, "rollout sampling temperature", gt=0.0)
    max_completion_length: int = help_field(160, "rollout budget in tokens", ge=1)
    engine: Literal["generate", "fast"] = help_field(
        "generate", "rollout decoding: generate (transformers' model.generate) | fast (steps.core.engine: finished "
                    "rows leave the batch; the same draws)")
    speculative: dict = field(default_factory=dict, metadata={
        "help": "engine fast: speculative decoding in the batch's tail, e.g. {draft_tokens: 4, max_batch: 4} "
                "(steps.core.engine.SpecConfig; empty: off)"})
    compile: bool = help_field(False, "engine fast: torch.compile the decode pass (a minute or two of compiling "
                                      "a process on CPU, then cheaper passes; README, TLT)")
    lambda_aux: float = help_field(0.01, "MoE load-balancing loss weight (ignored for dense models)", ge=0.0)
    save_steps: int = help_field(0, "a model-only checkpoint every N steps under <out>/checkpoints (0: none; "
                                    "bench/grpo_curve.py evaluates them on dev)", ge=0)
    bf16: bool | None = help_field(None, "None: on GPU only")
    threads: int = help_field(2, "torch CPU threads", ge=1)
    chat_template_kwargs: dict = field(default_factory=dict, metadata={"help": "e.g. {enable_thinking: true}"})
    seed: int = help_field(0, "null: base.seed")
    vllm: dict = field(default_factory=dict, metadata={"help": "rollouts on a vLLM server (VLLMServerConfig): "
                                                               "{mode: server, host, port | base_url, group_port, "
                                                               "timeout_s}; empty: in-process"})
    launcher: dict = field(default_factory=dict, metadata={
        "help": "{config: infra/accelerate/<ddp|fsdp|zero2|zero3>.yaml, num_processes: N}; empty: one process "
                "(steps/core/launch.py)"})

    def __post_init__(self) -> None:
        launch.parse(self.launcher)
        check_spec(self.rewards, "rewards")
        if self.speculative:
            from steps.core.engine import SpecConfig

            if self.engine != "fast":
                raise ValueError("speculative: speculative decoding needs engine: fast")
            SpecConfig.from_options(self.speculative, "speculative")
        if self.compile and self.engine != "fast":
            raise ValueError("compile: compiling is an option of engine: fast")
        if not self.rewards:
            raise ValueError("rewards: at least one reward is needed")
        server = self.vllm_server  # unknown keys and bad values fail here, with the key's name
        if server.mode == "server" and self.protocol not in SERVER_PROTOCOLS:
            raise ValueError(f"vllm.mode: server: the rollout protocol {self.protocol!r} drives the in-process "
                             f"policy model between generations (TRL's rollout_func hands it the trainer), which "
                             f"a vLLM server cannot do; server mode serves {list(SERVER_PROTOCOLS)}: "
                             "set vllm: {} for this stage")

    @property
    def vllm_server(self) -> VLLMServerConfig:
        from steps.core.config import build

        return build(VLLMServerConfig, dict(self.vllm), "vllm")


def vllm_grpo_args(cfg: RLConfig, cuda: bool, section: str) -> dict[str, Any]:
    """GRPOConfig's vLLM fields for the stage's `vllm` key ({} when off). Refused without CUDA:
    TRL pushes weights to the server over NCCL, and a CPU run must never take this path."""
    from steps.core.config import ConfigError

    server = cfg.vllm_server
    if server.mode == "off":
        return {}
    if not cuda:
        raise ConfigError(f"params.yaml: section '{section}': vllm.mode: server needs CUDA GPUs (the trainer pushes "
                          "its weights to the trl vllm-serve server over NCCL) and none is visible; remove the "
                          "vllm key to decode rollouts in-process, or run on a GPU machine (README: GRPO rollouts "
                          "on a vLLM server)")
    args: dict[str, Any] = {"use_vllm": True, "vllm_mode": "server", "vllm_group_port": server.group_port,
                            "vllm_server_timeout": server.timeout_s}
    if server.base_url:
        args["vllm_server_base_url"] = server.base_url
    else:
        args.update(vllm_server_host=server.host, vllm_server_port=server.port)
    return args


class TRLServerBackend:
    """The generation back end over TRL's VLLMClient (a trl vllm-serve's /v1/completions), so
    the stage's rollout decodes on the server that holds the live weights. TRL gives the client
    to the main process only: every process's prompts are gathered there, generated in one
    request and each process gets its share back (one generate call per rollout: the server
    protocols make exactly one). Seeds: one per request, not per row (vLLM's server takes one)."""

    name = "trl-vllm-server"

    def __init__(self, client: Any, tokenizer: Any, accelerator: Any = None):
        self.client, self.tokenizer, self.accelerator = client, tokenizer, accelerator

    def _eos_ids(self) -> set[int]:
        return {i for i in (self.tokenizer.eos_token_id,) if i is not None}

    def generate(self, prompts, sampling, on_batch=None):
        from steps.core.backends import Completion

        texts = [p.text for p in prompts]
        acc = self.accelerator
        if acc is not None and acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list, gather_object

            everyone = gather_object([texts])  # one list per process, in process order
            flat = [t for part in everyone for t in part]
            box = [self._request(flat, sampling) if acc.is_main_process else None]
            broadcast_object_list(box, from_process=0)
            start = sum(len(part) for part in everyone[:acc.process_index])
            got = box[0]
            out = {"prompt_ids": got["prompt_ids"][start:], "completion_ids": got["completion_ids"][start * sampling.n:],
                   "latency_s": got["latency_s"]}
        else:
            out = self._request(texts, sampling)
        eos = self._eos_ids()
        results: list[list[Completion]] = []
        t_share = out["latency_s"] / max(1, len(texts))
        for i, _ in enumerate(texts):
            comps = []
            for ids in out["completion_ids"][i * sampling.n:(i + 1) * sampling.n]:
                stop = next((k for k, t in enumerate(ids) if t in eos), None)
                kept = ids if stop is None else ids[:stop]
                comps.append(Completion(text=self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                                        completion_tokens=len(kept), finish_reason="length" if stop is None else "stop",
                                        prompt_tokens=len(out["prompt_ids"][i]), latency_s=t_share,
                                        token_ids=tuple(kept)))
            results.append(comps)
        if on_batch:
            on_batch(list(range(len(texts))), results)
        return results

    def _request(self, texts: list[str], sampling: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        out = self.client.generate(prompts=texts, n=sampling.n, temperature=sampling.temperature,
                                   top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, logprobs=None,
                                   generation_kwargs={"seed": sampling.seed})
        return {"prompt_ids": out["prompt_ids"], "completion_ids": out["completion_ids"],
                "latency_s": time.perf_counter() - t0}

    def close(self) -> None:
        pass  # the trainer owns the client


def stage_section(cfg: RLConfig) -> str:
    """The params section of an RL stage's config (GrpoConfig -> grpo, AdaptThinkConfig -> adaptthink)."""
    return type(cfg).__name__.removesuffix("Config").lower()


def rollout_func(cfg: RLConfig) -> Callable[[list[str], Any], dict[str, Any]]:
    """TRL's `rollout_func` over the stage's rollout, decoding the trainer's live policy."""
    from trl.distributed import DistributedBackend
    from trl.models import unwrap_model_for_generation

    from steps.core.backends import SamplingParams, TransformersBackend, derive_seed
    from steps.core.drafter import SpecState, rft_sequences
    from steps.core.engine import SpecConfig
    from steps.core.prompts import Prompt
    from steps.core.rollouts import make_rollout

    spec = SpecConfig.from_options(cfg.speculative, "speculative") if cfg.engine == "fast" else None
    states: list[SpecState] = []  # one for the run: the drafter follows the policy, the bandit learns

    def run(prompts: list[str], trainer: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        tok = trainer.processing_class
        acc = trainer.accelerator
        with unwrap_model_for_generation(trainer.model_wrapped, acc,
                                         gather_deepspeed3_params=trainer.args.ds3_gather_for_generation) as model, \
                DistributedBackend(acc).summon_full_params(trainer.model_wrapped, recurse=False), \
                training.generation_mode(model):
            if getattr(trainer, "use_vllm", False):  # server mode: TRL has just pushed the live weights there
                backend = TRLServerBackend(getattr(trainer.vllm_generation, "vllm_client", None), tok, acc)
            else:
                if spec is not None and not states:
                    states.append(SpecState(spec, model.get_output_embeddings().in_features, seed=cfg.seed))
                    if spec.init_data and states[0].drafter is not None:  # TLT: once, from the RFT data
                        seqs = rft_sequences(spec.init_data, spec.init_examples, tok, spec.init_rows,
                                             cfg.chat_template_kwargs)
                        log_rollout_stats(trainer, [], {f"{k}_init": v for k, v in
                                                        states[0].warm_start(model, seqs).items()})
                backend = TransformersBackend("policy", model_obj=model, tokenizer_obj=tok, batch_size=len(prompts),
                                              engine=cfg.engine, speculative=cfg.speculative or None,
                                              compile=cfg.compile,
                                              spec_state=states[0] if states else None)
            rollout = make_rollout(cfg.protocol, backend, **cfg.protocol_options)
            step = trainer.state.global_step
            # One seed per prompt occurrence: the K copies of a prompt must differ. The index is
            # global (this process holds the step's slice number process_index), so a launched
            # run draws the completions a single process would.
            first = acc.process_index * len(prompts)
            ps = [Prompt(messages=(), text=p, key=f"{step}/{first + i}") for i, p in enumerate(prompts)]
            sampling = SamplingParams(n=1, temperature=cfg.temperature, max_new_tokens=cfg.max_completion_length,
                                      seed=derive_seed(cfg.seed, "rl", step))
            outs = [cs[0] for cs in rollout.run(ps, sampling)]
            rollout_s = time.perf_counter() - t0  # the drafter's init and decoding; its training below
            # TLT: the drafter trains between steps on this rollout's features (timed in the step).
            extra = states[0].after_rollout(model) if states else {}
            engine_stats = getattr(backend, "last_stats", None)
        log_rollout_stats(trainer, outs, {**extra, **speculation_stats(engine_stats), "time/rollout_s": rollout_s})
        eos = tok.eos_token_id
        completion_ids, masks = [], []
        for c in outs:
            stop = c.finish_reason == "stop" and eos is not None
            completion_ids.append(list(c.token_ids) + ([eos] if stop else []))
            masks.append(list(c.mask) + ([1] if stop else []))
        columns = sorted({k for c in outs for k in c.meta.get("reward_columns", {})})
        return {"prompt_ids": [tok(p, add_special_tokens=False)["input_ids"] for p in prompts],
                "completion_ids": completion_ids, "logprobs": None, "env_mask": masks,
                "policy_tokens": [c.policy_tokens for c in outs],
                "external_tokens": [c.external_tokens for c in outs],
                **{k: [c.meta.get("reward_columns", {}).get(k) for c in outs] for k in columns}}
    run.spec_states = states  # type: ignore[attr-defined]  # what tests and callers inspect after a run
    return run


def rollout_stats(outs: list[Any]) -> dict[str, float]:
    """Per-step means of the rollout's numeric per-completion meta (calls, calls per member,
    inserted tokens, cost, thinking, ...): a completion without a key counts 0 for it."""
    keys = sorted({k for c in outs for k, v in c.meta.items() if isinstance(v, (int, float))})
    return {f"rollout/{k}": sum(float(c.meta.get(k, 0)) for c in outs) / len(outs) for k in keys} if outs else {}


def speculation_stats(stats: dict[str, Any] | None) -> dict[str, float]:
    """The fast engine's speculation per step: drafts kept per row and verification pass (TLT's
    accepted length less the one token a pass always yields), passes, drafting seconds."""
    if not stats or not stats.get("verify_passes"):
        return {}
    return {"spec/accepted_per_pass": stats["accepted"] / stats["verify_row_passes"],
            "spec/verify_passes": float(stats["verify_passes"]),
            "spec/forward_passes": float(stats["forward_passes"]),
            "spec/draft_seconds": float(stats.get("draft_seconds", 0.0))}


def log_rollout_stats(trainer: Any, outs: list[Any], extra: dict[str, float] | None = None) -> None:
    """Into the train log beside the rewards: GRPOTrainer averages `_metrics["train"]` into each
    log line (trl 1.16), so a curve such as calls per member over training is a column of
    train_log.csv. Each process logs its own slice's means; `extra` adds per-step figures
    (speculation, the drafter's training), NaN ones left out."""
    metrics = getattr(trainer, "_metrics", None)
    if metrics is None:  # another trainer: the rewards' columns are still logged
        return
    for k, v in {**rollout_stats(outs), **(extra or {})}.items():
        if v == v:
            metrics["train"][k].append(v)


def make_trainer_class(advantage: str, old_logp_override: Callable[[dict[str, Any]], Any] | None):
    """GRPOTrainer with the wrapper's two hooks (raw advantages, old log-prob overrides). An
    override may carry `stats(inputs, batch, own_logps) -> {column: value}`: logged per step as
    train_log.csv columns, from the policy's own log-probs of the completions before the override
    (where a rollout forced a token, how likely the policy was to choose it)."""
    import torch
    from trl import GRPOTrainer

    class RLTrainer(GRPOTrainer):
        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            t0 = time.perf_counter()
            per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            # Beside the rollout's time/rollout_s: what of TRL's step_time the rewards take.
            self._metrics["train"]["time/rewards_s"].append(time.perf_counter() - t0)
            self._last_rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            return per_func

        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            if advantage == "raw":
                # rewards are gathered over processes; this process's slice, as TRL slices advantages
                n = out["advantages"].size(0)
                start = self.accelerator.process_index * n
                out["advantages"] = self._last_rewards[start:start + n].to(out["advantages"].dtype)
            if old_logp_override is not None:
                old = out.get("old_per_token_logps")
                if old is None:
                    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
                    mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
                    with torch.no_grad():
                        old, _, _ = self._get_per_token_logps_and_entropies(
                            self.model, ids, mask, out["completion_ids"].size(1), batch_size=ids.size(0))
                # What the policy itself would have chosen where the rollout forced a token (e.g.
                # AdaptThink's decision): its own log-probs, before the override replaces them.
                stats = getattr(old_logp_override, "stats", None)
                if stats is not None:
                    for k, v in stats(inputs, out, old).items():
                        self._metrics["train"][k].append(v)
                forced = old_logp_override(out)  # (B, T): NaN where the model's own log-prob stands
                out["old_per_token_logps"] = torch.where(torch.isnan(forced), old, forced.to(old.dtype))
            return out

    return RLTrainer


def train_rl(cfg: RLConfig, rows: list[dict[str, Any]], policy: str, out_dir: Path,
             old_logp_override: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Train `policy` (a model directory) on prompt rows (`prompt` plus the columns the rewards
    read); saves out_dir/model. Returns {"history": [...], "metrics": {...}}."""
    import os

    from datasets import Dataset
    from transformers import AutoConfig, AutoTokenizer
    from trl import GRPOConfig

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is our deliberate choice

    import torch

    # Before anything loads: a CPU run must never take the vLLM server path.
    vllm_args = vllm_grpo_args(cfg, torch.cuda.is_available(), stage_section(cfg))
    training.set_threads(cfg.threads)
    reward_fns, weights = make_rewards(cfg.rewards)
    is_moe = hasattr(AutoConfig.from_pretrained(policy), "output_router_logits")
    batch = cfg.prompts_per_step * cfg.num_generations
    args = GRPOConfig(**training.common_args(out_dir / "checkpoints", seed=cfg.seed, learning_rate=cfg.learning_rate,
                                             batch_size=batch, max_steps=cfg.max_steps, epochs=1.0,
                                             warmup_ratio=cfg.warmup_ratio, logging_steps=5, bf16=cfg.bf16,
                                             batch_key="prompts_per_step x num_generations",
                                             save_steps=cfg.save_steps),
                      num_generations=cfg.num_generations, generation_batch_size=batch,
                      max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
                      beta=cfg.beta, epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                      num_iterations=cfg.num_iterations, loss_type=cfg.loss_type,
                      importance_sampling_level=cfg.importance_sampling_level,
                      scale_rewards="none" if cfg.advantage == "raw" else cfg.advantage,
                      reward_weights=weights, remove_unused_columns=False, log_completions=False,
                      router_aux_loss_coef=cfg.lambda_aux if is_moe else None,
                      # Rollouts must not compute the MoE router loss (it fails on padded, cached
                      # generation); TRL asks for router logits in the training forward pass itself.
                      model_init_kwargs={"output_router_logits": False} if is_moe else None, **vllm_args)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    trainer_cls = make_trainer_class(cfg.advantage, old_logp_override)
    # The reference model (beta > 0) is built from the policy's path, so pass the directory.
    trainer = trainer_cls(model=policy, reward_funcs=reward_fns, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, rollout_func=rollout_func(cfg))
    result = trainer.train()
    trainer.model.config.use_cache = True
    trainer.save_model(str(out_dir / "model"))  # on the main process (FSDP / ZeRO-3: gathered from every one)
    if launch.is_main():
        tokenizer.save_pretrained(out_dir / "model")
    launch.wait_for_everyone()  # the model is complete on disk before any process reads it back
    history = training.history_rows(trainer.state.log_history)
    last = next((h for h in reversed(history) if "reward" in h), {})
    metrics = {"train_loss": float(result.training_loss), "steps": int(result.global_step),
               "final_reward": last.get("reward"), "final_completion_length": last.get("completions/mean_length")}
    return {"history": history, "metrics": metrics}


def prompt_rows(cfg: RLConfig, examples: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    """The first `max_prompts` training examples with their rendered prompt (the stage's chat
    template switches and its rollout's, e.g. enable_thinking)."""
    from transformers import AutoTokenizer

    return training.prompt_rows(examples[: cfg.max_prompts], AutoTokenizer.from_pretrained(policy),
                                cfg.chat_template_kwargs)
