"""router: Router-R1 (arXiv 2506.09033): a policy that thinks, routes sub-questions to a pool of models
and pays for what it calls, trained by RL on the pipeline's data, once per cost weight alpha.

The pool (`router.pool`, shared with the models rows through a YAML anchor): the embedded default
is the teacher (the most accurate and the dearest), the student base (the cheapest) and the RFT
model (in between), priced by their decode TFLOPs per million tokens (steps/core/rollouts/router.py).
The policy starts from the RFT model. Its word-level vocabulary cannot spell the routing tags or
a member name such as `student_base`: they are added to it as ordinary tokens (not special:
the rewards and the rollout read them in decoded text) and the embeddings are resized, as the
relay stage adds its command tags; the shared tokenizer builder (steps/core/modeling.py) is left
as it is. Training prompts carry the routing system turn (the rules and one line per member).

For each alpha in `alphas` (0, 0.5 and 0.9: the paper's default, a middle and its suggested
cost-aware value) one policy is trained with the routed rollout and the rewards of
steps/core/rewards/router.py (`router_r1` weighted 1; its parts logged at weight 0), through the
shared RL trainer (steps/core/rl.py).

Where we depart from the paper: it trains with PPO and a learned critic (verl); we use GRPO (group
z-score advantages, no critic), the pipeline's one RL trainer. Its policy is an instruct model
that follows the routing format from the prompt alone; a tiny embedded policy cannot read the
prompt's rules and never writes a tag, so every response would break the format, every reward
would be -1 and GRPO would have no signal. Hence an optional warm-up SFT (`warmup_steps` > 0; 0
is the paper's setting) on format-only traces made without labels: the policy's own sample
(thinking T, answer X), and for every other prompt one call to a uniformly drawn member with the
question, whose real reply is inserted:
    <think> T </think> <answer> X </answer>
    <think> T </think> <search> m : Q </search> <information> reply </information> <think> m : the answer is Xm </think> <answer> Xm </answer>
It teaches the syntax and that a reply can be used, not which member to call: that is RL's job.

Input: rft/model, the pool's models (pretrain_demo/teacher, pretrain_demo/student_base,
rft/model), ingest/train.jsonl. Output: alpha_<a>/model (one policy per alpha),
alpha_<a>/train_log.csv, policy_base/ (the RFT model with the routing tokens), warmup/model (after
the warm-up SFT, when there is one) and metrics.json.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core import launch
from steps.core.config import help_field, load_config
from steps.core.rl import RLConfig, finish_stage, train_rl
from steps.core.schemas import EXAMPLES, read_validated


@dataclass(frozen=True)
class RouterConfig(RLConfig):
    rewards: dict = field(default_factory=lambda: {"router_r1": {"weight": 1.0}},
                          metadata={"help": "reward name -> {weight, options}; router_r1 is required (its alpha and "
                                            "members are set per run from `alphas` and `pool`)"})
    protocol: str = help_field("router", "the routed rollout (steps/core/rollouts/router.py)")
    pool: tuple[dict, ...] = help_field((), "members: {name, backend, model, price_per_million (null: decode "
                                            "TFLOPs per million tokens), descriptor, options}")
    alphas: tuple[float, ...] = help_field((0.0, 0.5, 0.9), "one policy per cost weight alpha (output alpha_<a>/)")
    max_rounds: int = help_field(4, "member calls per response (the paper: 4)", ge=0)
    max_information_tokens: int = help_field(64, "cap on an inserted member answer", ge=1)
    member_max_new_tokens: int = help_field(64, "a member's generation budget per call", ge=1)
    member_temperature: float = help_field(0.0, "the members' sampling temperature (0: greedy)", ge=0.0)
    warmup_steps: int = help_field(0, "warm-up SFT steps on format-only routed traces (0: none, as the paper)", ge=0)
    warmup_learning_rate: float = help_field(1e-3, "warm-up SFT peak learning rate", gt=0.0)
    warmup_batch_size: int = help_field(16, "warm-up SFT batch size", ge=1)
    sample_max_new_tokens: int = help_field(160, "budget of the policy's own warm-up samples", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if "router_r1" not in self.rewards:
            raise ValueError("rewards: router_r1 is required (the stage sets its alpha per run)")
        if not self.pool:
            raise ValueError("pool: at least one member is needed")
        from steps.core.rollouts.router import parse_pool
        parse_pool(self.pool)
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas) or len(set(self.alphas)) != len(self.alphas):
            raise ValueError(f"alphas: expected distinct values in [0, 1], got {list(self.alphas)}")

    def member_names(self) -> list[str]:
        return [m["name"] for m in self.pool]

    def rollout_options(self) -> dict[str, Any]:
        return {"pool": [dict(m) for m in self.pool], "max_rounds": self.max_rounds,
                "max_information_tokens": self.max_information_tokens,
                "member_max_new_tokens": self.member_max_new_tokens,
                "member_temperature": self.member_temperature, **self.protocol_options}

    def for_alpha(self, alpha: float) -> RouterConfig:
        names = self.member_names()
        rewards = {k: dict(v or {}) for k, v in self.rewards.items()}
        rewards["router_r1"].update(alpha=alpha, members=names)
        if "router_format" in rewards:
            rewards["router_format"]["members"] = names
        return dataclasses.replace(self, rewards=rewards, protocol_options=self.rollout_options())


def alpha_dir(alpha: float) -> str:
    return f"alpha_{alpha:g}"


def add_routing_tokens(model_dir: str, out: Path, names: list[str], seed: int) -> tuple[str, bool]:
    """The policy with a tokenizer that spells the routing tags and the member names (added as
    ordinary tokens when it cannot), saved under `out`; (its directory, whether tokens were added)."""
    from transformers import AutoTokenizer

    from steps.core.vocab import add_vocabulary
    from steps.core.rollouts.router import ROUTER_TAGS

    tok = AutoTokenizer.from_pretrained(model_dir)
    unk = tok.unk_token_id

    def spelled(word: str) -> bool:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        return unk is None or (unk not in ids and (word not in ROUTER_TAGS or len(ids) == 1))

    missing = [w for w in [*ROUTER_TAGS, *names] if not spelled(w)]
    if not missing:
        return model_dir, False
    return add_vocabulary(model_dir, out, missing, seed), True


def routing_prompt_rows(cfg: RouterConfig, examples: list[dict[str, Any]], policy: str) -> list[dict[str, Any]]:
    """Training rows: each example with its prompt rendered with the routing system turn."""
    from transformers import AutoTokenizer

    from steps.core import prompts as P
    from steps.core.rollouts.router import parse_pool, routing_messages

    tok = AutoTokenizer.from_pretrained(policy)
    pool = parse_pool(cfg.pool)
    return [{**e, "prompt": tok.apply_chat_template(routing_messages(P.messages(e), pool, cfg.max_rounds), tokenize=False,
                                                    add_generation_prompt=True, **cfg.chat_template_kwargs)}
            for e in examples[: cfg.max_prompts]]


def warmup_rows(cfg: RouterConfig, rows: list[dict[str, Any]], policy: str) -> list[dict[str, str]]:
    """Format-only SFT rows (module docstring): the policy's own samples, every other one with one
    call to a uniformly drawn member (seeded per example) whose real reply is inserted."""
    import random

    from steps.core import prompts as P
    from steps.core.backends import SamplingParams, TransformersBackend, derive_seed
    from steps.core.metrics import extract_answer
    from steps.core.rollouts.router import OUR_TAGS, RouterRollout, documents_span, member_prompt

    backend = TransformersBackend(policy, threads=cfg.threads)
    plain = [P.build(r, backend.tokenizer, cfg.chat_template_kwargs) for r in rows]
    sampling = SamplingParams(n=1, temperature=1.0, max_new_tokens=cfg.sample_max_new_tokens,
                              seed=derive_seed(cfg.seed, "router", "warmup"))
    own = [cs[0].text for cs in backend.generate(plain, sampling)]

    def clean(text: str) -> str:  # a sample may hold stray tags: they would break the format taught
        return " ".join(OUR_TAGS.sub(" ", text).split())

    rollout = RouterRollout(backend, **cfg.rollout_options())
    names = list(rollout.members)
    calls: dict[int, str] = {}
    for i, r in enumerate(rows):
        if i % 2:
            calls[i] = random.Random(derive_seed(cfg.seed, "router-warmup", r["id"])).choice(names)
    replies: dict[int, str] = {}
    for name in dict.fromkeys(calls.values()):
        idx = [i for i, n in calls.items() if n == name]
        member = rollout.members[name]
        prompts = [member_prompt(member, documents_span(P.user_turn(rows[i])), rows[i]["question"],
                                 f"{rows[i]['id']}/warmup/{name}") for i in idx]
        sp = SamplingParams(n=1, temperature=cfg.member_temperature, max_new_tokens=cfg.member_max_new_tokens,
                            seed=derive_seed(cfg.seed, "router-warmup-member"))
        for i, cs in zip(idx, member.generate(prompts, sp), strict=True):
            replies[i] = clean(P.split_completion(cs[0].text)[1]) or "no answer"
    out = []
    for i, (r, text) in enumerate(zip(rows, own, strict=True)):
        thinking, response = (clean(t) for t in P.split_completion(text))
        thinking = thinking or r["question"]
        if i in calls:
            name, reply = calls[i], replies[i]
            answer = clean(extract_answer(reply)) or "no answer"
            trace = (f"<think> {thinking} </think> <search> {name} : {r['question']} </search> "
                     f"<information> {reply} </information> <think> {name} : the answer is {answer} </think> "
                     f"<answer> {answer} </answer>")
        else:
            trace = f"<think> {thinking} </think> <answer> {clean(extract_answer(response)) or 'no answer'} </answer>"
        out.append({"prompt": r["prompt"], "completion": trace})
    return out


def warm_up(cfg: RouterConfig, rows: list[dict[str, Any]], policy: str, out: Path) -> tuple[str, dict[str, Any]]:
    """(the policy to train by RL, warm-up metrics): the warm-up SFT's model, or `policy` without one."""
    if cfg.warmup_steps == 0:
        return policy, {}
    from steps.rft import RftConfig, train_sft

    sft_rows = warmup_rows(cfg, rows, policy)
    sft = RftConfig(max_steps=cfg.warmup_steps, learning_rate=cfg.warmup_learning_rate, batch_size=cfg.warmup_batch_size,
                    lambda_aux=cfg.lambda_aux, bf16=cfg.bf16, threads=cfg.threads, max_length=1024,
                    chat_template_kwargs=cfg.chat_template_kwargs, seed=cfg.seed)
    result = train_sft(sft, sft_rows, policy, out / "warmup", stage_name="router warm-up")
    calls = sum("<search>" in r["completion"] for r in sft_rows)
    return str(out / "warmup" / "model"), {"warmup_rows": len(sft_rows), "warmup_rows_with_a_call": calls,
                                           "warmup_final_loss": result["metrics"]["final_loss"]}


def main(argv: list[str] | None = None) -> None:
    from steps.core.io import write_json
    from steps.core.rollouts.router import parse_pool, release_members

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--data", default="data/ingest/train.jsonl")
    ap.add_argument("--rft", default="data/rft/model")
    ap.add_argument("--out", default="data/router")
    args = ap.parse_args(argv)
    cfg = load_config(RouterConfig, "router", args.params)
    if launch.relaunched("steps.router", cfg.launcher, argv, args.params, "router"):
        return
    out = Path(args.out)
    policy, added = add_routing_tokens(args.rft, out / "policy_base", cfg.member_names(), cfg.seed)
    rows = routing_prompt_rows(cfg, read_validated(args.data, EXAMPLES), policy)
    policy, warm = warm_up(cfg, rows, policy, out)
    summary: dict[str, Any] = {"routing_tokens_added": added, **warm}
    for alpha in cfg.alphas:
        run_cfg = cfg.for_alpha(alpha)
        result = train_rl(run_cfg, rows, policy, out / alpha_dir(alpha))
        finish_stage(f"router@{alpha_dir(alpha)}", run_cfg, policy, out / alpha_dir(alpha), result)
        summary[alpha_dir(alpha)] = result["metrics"]
    release_members(parse_pool(cfg.pool))
    write_json(out / "metrics.json", summary)


if __name__ == "__main__":
    main()
