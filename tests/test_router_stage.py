"""The Router-R1 stage (steps/router.py): params and dvc.yaml in step, the routing tokens, and one
training run on tiny models end to end (policy, real in-process members, routed rollouts)."""
from __future__ import annotations

import json

import pytest
import torch
import yaml

from steps.core.config import load_config
from steps.router import RouterConfig, add_routing_tokens, alpha_dir, routing_prompt_rows
from tests.helpers import ROOT, TINY_DENSE, examples, tiny_model


def test_repository_params_load_and_the_rows_share_the_stage_pool():
    from steps.core.registry import load_registry

    cfg = load_config(RouterConfig, "router", ROOT / "params.yaml")
    rows = load_registry(ROOT / "params.yaml")
    routed = [r for r in rows.values() if r.protocol in ("router", "route_member", "route_random")]
    assert len(routed) == 7 and all(not r.main for r in routed)
    for r in routed:
        assert [dict(m) for m in r.options["pool"]] == [dict(m) for m in cfg.pool], r.name
    for r in (rows["router_r1"], rows["router_r1_a05"], rows["router_r1_a09"]):
        o = r.options
        assert (o["max_rounds"], o["max_information_tokens"], o["member_max_new_tokens"]) == \
            (cfg.max_rounds, cfg.max_information_tokens, cfg.member_max_new_tokens), r.name
    # one routed row per trained alpha, at the stage's output
    assert sorted(r.path for r in rows.values() if r.protocol == "router") == \
        sorted(f"data/router/{alpha_dir(a)}/model" for a in cfg.alphas)
    assert {rows[f"route_{m}"].options["member"] for m in cfg.member_names()} == set(cfg.member_names())
    assert cfg.rewards["router_r1"]["weight"] == 1.0 and cfg.for_alpha(0.9).rewards["router_r1"]["alpha"] == 0.9


def test_the_stage_outputs_follow_the_alphas():
    cfg = load_config(RouterConfig, "router", ROOT / "params.yaml")
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["router"]
    assert stage["outs"] == [f"data/router/{alpha_dir(a)}/model" for a in cfg.alphas]
    assert {"data/pretrain_demo/teacher", "data/pretrain_demo/student_base", "data/rft/model"} <= set(stage["deps"])


@pytest.mark.parametrize("section, message", [
    ({"rewards": {"router_format": {}}}, "router_r1 is required"),
    ({"pool": []}, "at least one member"),
    ({"alphas": [0.0, 1.5]}, "alphas"),
    ({"pool": [{"name": "Big", "price_per_million": 1}]}, "one lower-case word"),
])
def test_config_errors(section, message):
    from steps.core.config import ConfigError, build
    base = {"pool": [{"name": "a", "price_per_million": 1.0}]}
    with pytest.raises(ConfigError, match=message):
        build(RouterConfig, {**base, **section}, "params.yaml: section 'router'")


def test_routing_tokens_are_added_to_a_vocabulary_that_cannot_spell_them(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.core.rollouts.router import ROUTER_TAGS

    rows = examples(2, 2)
    base = tiny_model(tmp_path / "base", TINY_DENSE, rows)
    path, added = add_routing_tokens(str(base), tmp_path / "policy", ["teacher", "student_base", "rft"], 0)
    assert added
    tok = AutoTokenizer.from_pretrained(path)
    for word in [*ROUTER_TAGS, "student_base", "rft"]:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != tok.unk_token_id, word
    assert tok.decode(tok("<search> rft : what city ? </search>", add_special_tokens=False)["input_ids"]) == \
        "<search> rft : what city ? </search>"
    weight = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight.detach()
    assert weight.shape[0] == len(tok)
    # The new rows are told apart from the start (steps.core.vocab.init_added_rows): with
    # transformers' mean resizing they were one vector to 1e-5 and a short warm-up left them alike.
    new, old = weight[-len(ROUTER_TAGS) - 2:], weight[:-len(ROUTER_TAGS) - 2]
    cos = torch.nn.functional.cosine_similarity(new[:, None], new[None], dim=-1)
    assert cos[~torch.eye(len(new), dtype=torch.bool)].max() < 0.9
    assert 0.5 < new.norm(dim=1).mean() / old.norm(dim=1).mean() < 2.0
    assert add_routing_tokens(path, tmp_path / "again", ["teacher", "student_base", "rft"], 0) == (path, False)


def test_the_stage_trains_one_policy_per_alpha_on_tiny_models(tmp_path):
    """Real tiny members in-process, routed rollouts, the router_r1 reward: one step per alpha."""
    from steps import router as stage
    from steps.core.io import write_jsonl

    rows = examples(4, 2)
    teacher = tiny_model(tmp_path / "teacher", TINY_DENSE, rows, seed=1)
    rft = tiny_model(tmp_path / "rft", TINY_DENSE, rows)
    pool = [{"name": "teacher", "model": str(teacher), "descriptor": "dear"},
            {"name": "rft", "model": str(rft), "descriptor": "cheap"}]
    params = {"base": {"seed": 0}, "router": {
        "pool": pool, "alphas": [0.0, 0.9], "max_steps": 1, "num_generations": 2, "prompts_per_step": 2,
        "max_prompts": 4, "max_completion_length": 24, "member_max_new_tokens": 6, "max_information_tokens": 6,
        "warmup_steps": 1, "warmup_batch_size": 4, "sample_max_new_tokens": 8,
        "rewards": {"router_r1": {"weight": 1.0}, "router_cost": {"weight": 0.0}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "router"
    stage.main(["--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "train.jsonl"),
                "--rft", str(rft), "--out", str(out)])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["routing_tokens_added"] is True
    assert metrics["warmup_rows"] == 4 and metrics["warmup_rows_with_a_call"] == 2
    assert (out / "warmup" / "model" / "config.json").exists()
    for a in (0.0, 0.9):
        assert (out / alpha_dir(a) / "model" / "config.json").exists()
        assert (out / alpha_dir(a) / "model" / "flops_profile.json").exists()
        assert metrics[alpha_dir(a)]["steps"] == 1
        # Calls per member over training: the rollout's statistics are train-log columns.
        header = (out / alpha_dir(a) / "train_log.csv").read_text().splitlines()[0].split(",")
        assert {"rollout/calls", "rollout/calls_teacher", "rollout/calls_rft", "rollout/cost"} <= set(header)
    cfg = load_config(RouterConfig, "router", tmp_path / "params.yaml")
    prompt = routing_prompt_rows(cfg, rows, str(out / "policy_base"))[0]["prompt"]
    assert "teacher : dear" in prompt and "rft : cheap" in prompt


def test_routed_rows_evaluate_with_cost_and_calls_per_member(tmp_path):
    """evaluate_model over the routed protocols on tiny models: the predictions validate, every
    row carries cost and calls per member in extras, and a member alone is the plain row plus its
    price (same decoding, same judge)."""
    from steps.core.schemas import PREDICTIONS, validate
    from steps.evaluate import EvaluateConfig, evaluate_model
    from steps.report import summarise

    rows = examples(3, 1)
    teacher = tiny_model(tmp_path / "teacher", TINY_DENSE, rows, seed=1)
    rft = tiny_model(tmp_path / "rft", TINY_DENSE, rows)
    policy, _ = add_routing_tokens(str(rft), tmp_path / "policy", ["teacher", "rft"], 0)
    pool = [{"name": "teacher", "model": str(teacher), "descriptor": "dear"},
            {"name": "rft", "model": str(rft), "descriptor": "cheap"}]
    cfg = EvaluateConfig(max_new_tokens=12, latency_probe_n=1, backend_options={"batch_size": 8})
    preds = {}
    for name, path, protocol, options in [
            ("router_r1", policy, "router", {"pool": pool, "member_max_new_tokens": 4}),
            ("route_teacher", str(teacher), "route_member", {"pool": pool, "member": "teacher"}),
            ("route_random", policy, "route_random", {"pool": pool}),
            ("teacher", str(teacher), "plain", {})]:
        preds[name], _ = evaluate_model(cfg, name, path, rows, tmp_path / name, protocol, options)
        validate(preds[name], PREDICTIONS, f"{name}/predictions.jsonl")
    for name in ("router_r1", "route_teacher", "route_random"):
        assert all({"cost", "calls", "calls_teacher", "calls_rft", "tokens_teacher"} <= set(p["extras"])
                   for p in preds[name]), name
    alone, plain = preds["route_teacher"], preds["teacher"]
    assert [p["response"] for p in alone] == [p["response"] for p in plain]
    assert [p["correct"] for p in alone] == [p["correct"] for p in plain]
    assert all(p["extras"]["calls_teacher"] == 1 and p["extras"]["cost"] > 0 for p in alone)
    assert all(p["extras"]["calls"] == 1 for p in preds["route_random"])
    summary = summarise(preds, {})
    assert summary["datasets"]["musique"]["route_teacher"]["extras/cost"] > 0


def test_warmup_traces_keep_the_format_and_insert_a_real_member_reply(tmp_path):
    from steps.core.rewards.router import format_violation
    from steps.router import warmup_rows

    rows = examples(4, 0)
    teacher = tiny_model(tmp_path / "teacher", TINY_DENSE, rows, seed=1)
    rft = tiny_model(tmp_path / "rft", TINY_DENSE, rows)
    policy, _ = add_routing_tokens(str(rft), tmp_path / "policy", ["teacher", "rft"], 0)
    pool = [{"name": "teacher", "model": str(teacher)}, {"name": "rft", "model": str(rft)}]
    cfg = RouterConfig(pool=pool, sample_max_new_tokens=8, member_max_new_tokens=8)
    traces = warmup_rows(cfg, routing_prompt_rows(cfg, rows, policy), policy)
    assert len(traces) == 4 and [("<search>" in t["completion"]) for t in traces] == [False, True, False, True]
    for t in traces:
        assert format_violation(t["completion"], ["teacher", "rft"]) is None, t["completion"]
        assert "the pool :" in t["prompt"]
