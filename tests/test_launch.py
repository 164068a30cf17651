"""Scale-out training (steps/core/launch.py, infra/accelerate/): the launcher key, the configs as
accelerate reads them, FSDP's wrapping of the MoE student, and real `accelerate launch` runs of
the rft and grpo stages on two CPU processes (gloo) against one plain process."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml

from steps.core import launch
from steps.core.config import ConfigError, load_config
from tests.helpers import TINY_MOE, examples, tiny_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED"}
# The measured differences (README): 2 DDP processes against 1, the same global batch, on CPU.
LOSS_TOLERANCE = 1e-3


def _params(tmp_path: Path, sections: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"seed": 0}, **sections}))
    return path


# --- the launcher key ----------------------------------------------------------------------------

def test_the_default_is_one_plain_process_and_a_launcher_is_checked_at_load(tmp_path):
    from steps.grpo import GrpoConfig
    from steps.rft import RftConfig

    cfg = load_config(RftConfig, "rft", _params(tmp_path, {"rft": {}}))
    assert cfg.launcher == {} and not launch.relaunched("steps.rft", cfg.launcher, [], "p", "rft")
    with pytest.raises(ConfigError, match=r"section 'grpo': launcher.num_processes: 2 processes need "
                                          r"launcher.config"):
        load_config(GrpoConfig, "grpo", _params(tmp_path, {"grpo": {"launcher": {"num_processes": 2}}}))
    with pytest.raises(ConfigError, match=r"section 'rft': launcher: unknown key\(s\) \['procs'\]"):
        load_config(RftConfig, "rft", _params(tmp_path, {"rft": {"launcher": {"procs": 2}}}))
    with pytest.raises(ConfigError, match="train.launcher: the fusion stage trains in one process"):
        from steps.fusion import FusionConfig
        load_config(FusionConfig, "fusion", _params(tmp_path, {"fusion": {"train": {"launcher": {
            "config": "infra/accelerate/ddp.yaml", "num_processes": 2}}}}))


def test_a_missing_config_file_and_fsdp_without_a_gpu_are_refused_before_launching(tmp_path, monkeypatch):
    import torch

    monkeypatch.chdir(ROOT)
    monkeypatch.delenv(launch.LAUNCHED_ENV, raising=False)
    with pytest.raises(ConfigError, match=r"p.yaml: section 'rft': launcher.config: 'infra/accelerate/dp.yaml' "
                                          r"is not a file .*infra/accelerate/ddp.yaml"):
        launch.relaunched("steps.rft", {"config": "infra/accelerate/dp.yaml", "num_processes": 2}, [], "p.yaml", "rft")
    # DeepSpeed runs on CPU processes as well (its CPU accelerator over gloo): accepted anywhere
    assert launch.check_config("infra/accelerate/zero3.yaml", "rft.launcher.config") == "DEEPSPEED"
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs FSDP")
    with pytest.raises(ConfigError, match=r"launcher.config: infra/accelerate/fsdp.yaml asks for FSDP, which "
                                          r"accelerate runs on GPUs only"):
        launch.relaunched("steps.rft", {"config": "infra/accelerate/fsdp.yaml", "num_processes": 2}, [], "p", "rft")


def test_a_global_batch_splits_over_the_processes_or_says_which_key(monkeypatch):
    assert launch.per_device_batch(8, "rft.batch_size") == 8
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.per_device_batch(8, "rft.batch_size") == 4
    with pytest.raises(ConfigError, match="rft.batch_size = 7 sequences per optimiser step do not split over 2"):
        launch.per_device_batch(7, "rft.batch_size")


def test_the_launch_command_is_accelerate_launch_of_the_stage_module():
    cmd = launch.command("steps.grpo", launch.Launcher("infra/accelerate/zero3.yaml", 4, 29511), ["--out", "o"])
    assert cmd == [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "infra/accelerate/zero3.yaml",
                   "--num_processes", "4", "--main_process_port", "29511", "-m", "steps.grpo", "--out", "o"]


# --- the configs, as accelerate reads them --------------------------------------------------------

def _launch_env(name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file infra/accelerate/<name>.yaml` gives its
    processes (accelerate's own parsing and validation, without starting them)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(ROOT / f"infra/accelerate/{name}.yaml"),
                                               "--num_processes", "2", "--main_process_port", "0",
                                               "-m", "steps.rft"])
    args, defaults, _ = _validate_launch_command(args)
    if defaults.distributed_type.value == "DEEPSPEED":
        args.deepspeed_fields_from_accelerate_config = list(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_config_loads_in_accelerate_with_the_settings_it_documents(name):
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    assert launch.distributed_type(ROOT / f"infra/accelerate/{name}.yaml") == CONFIGS[name]
    env = _launch_env(name)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the stage's bf16 decides
    ours = {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    with mock.patch.dict(os.environ, ours):
        if name == "ddp":
            assert "ACCELERATE_USE_FSDP" not in env and "ACCELERATE_USE_DEEPSPEED" not in env
        elif name == "fsdp":
            plugin = FullyShardedDataParallelPlugin()
            assert (plugin.fsdp_version, plugin.reshard_after_forward, str(plugin.state_dict_type)) == (
                2, True, "StateDictType.FULL_STATE_DICT")
            assert plugin.transformer_cls_names_to_wrap is None  # the model's _no_split_modules
        else:
            plugin = DeepSpeedPlugin()
            zero = plugin.deepspeed_config["zero_optimization"]
            assert zero["stage"] == int(name[-1])
            # the trainer fills batch sizes from the stage's params
            assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == "auto"
            if name == "zero3":
                assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_fsdp_wraps_each_moe_decoder_layer_and_shards_the_experts_by_expert(tmp_path):
    """fsdp.yaml names no class: accelerate wraps the model's _no_split_modules. For the MoE
    student that is one unit per decoder layer, and the experts are fused tensors whose dim 0
    (what FSDP2 shards) is the expert index."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(tmp_path / "m", {**TINY_MOE, "num_hidden_layers": 2},
                                                            examples(2, 2)))
    env = {k: v for k, v in _launch_env("fsdp").items() if k.startswith(("ACCELERATE_", "FSDP_"))}
    with mock.patch.dict(os.environ, env):
        policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(), model)
    wrapped = [name for name, m in model.named_modules() if policy(m)]
    assert wrapped == ["model.layers.0", "model.layers.1"]
    experts = model.model.layers[0].mlp.experts
    assert {p.shape[0] for p in experts.parameters()} == {TINY_MOE["num_experts"]}


# --- real launches: 2 processes on CPU against 1 ---------------------------------------------------

def _losses(path: Path) -> dict[int, dict[str, float]]:
    """step -> the values logged at it (the trainer's end-of-run summary row left out)."""
    with open(path) as f:
        return {int(r["step"]): {k: float(v) for k, v in r.items() if v not in ("", None) and k != "step"}
                for r in csv.DictReader(f) if r.get("loss")}


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIPELINE_TRACKING": "off", "OMP_NUM_THREADS": "1"}
    env.pop(launch.LAUNCHED_ENV, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def _rft_workspace(tmp_path: Path) -> tuple[Path, list[str]]:
    rows = examples(8, 8)
    base = tiny_model(tmp_path / "base", TINY_MOE, rows)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = [{"id": r["id"], "dataset": r["dataset"], "sample_idx": 0,
             "completion": f"<think> {r['documents'][0]} </think> {r['answers'][0]}", "thinking": r["documents"][0],
             "response": r["answers"][0], "completion_tokens": 10, "finish_reason": "stop", "model": "teacher",
             "correct": 1, "helpful": 1, "rationale": "", "keep": True} for r in rows]
    (tmp_path / "kept.jsonl").write_text("".join(json.dumps(k) + "\n" for k in kept))
    (tmp_path / "models.json").write_text(json.dumps({"student_base": str(base), "teacher": str(base)}))
    return base, ["--data", str(tmp_path / "train.jsonl"), "--kept", str(tmp_path / "kept.jsonl"),
                  "--models", str(tmp_path / "models.json")]


DDP2 = {"config": "infra/accelerate/ddp.yaml", "num_processes": 2}


def _rft_twins(tmp_path: Path, launcher: dict, run_launched=None) -> dict[str, Path]:
    """The rft stage on the MoE student, global batch 8, 5 steps: once in one plain process ("one")
    and once under `launcher` ("launched"), through the stage's own launcher or `run_launched(args)`.
    Each writes and reports the stage once. -> {"one": out, "launched": out}."""
    _, io_args = _rft_workspace(tmp_path)
    runs = {}
    for name, spec in (("one", {}), ("launched", launcher)):
        params = tmp_path / f"params_{name}.yaml"
        params.write_text(yaml.safe_dump({"base": {"seed": 0}, "rft": {
            "max_steps": 5, "batch_size": 8, "learning_rate": 0.01, "threads": 1, "launcher": spec}}))
        out = tmp_path / f"out_{name}"
        args = ["--params", str(params), *io_args, "--out", str(out)]
        proc = run_launched(args) if spec and run_launched else _run("steps.rft", args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("rft: {") == 1  # one process wrote and reported the stage
        runs[name] = out
    return runs


def _assert_twins(tmp_path: Path, runs: dict[str, Path]) -> tuple[dict, dict]:
    """The launched run follows the one-process loss curve within LOSS_TOLERANCE, and its model is
    the twin's within a small part of what training moved it. -> both runs' weights."""
    from safetensors.torch import load_file

    one, other = _losses(runs["one"] / "train_log.csv"), _losses(runs["launched"] / "train_log.csv")
    assert sorted(one) == sorted(other) == [1, 5]
    for step in (1, 5):
        assert one[step]["num_tokens"] == other[step]["num_tokens"]  # the same sequences in each step
        for key in ("loss", "grad_norm"):
            assert abs(one[step][key] - other[step][key]) <= LOSS_TOLERANCE, (step, key, one[step], other[step])
        # The MoE load-balancing loss is computed over each process's own tokens: it is not
        # linear in them, so it differs a little more (measured 1.8e-3 at step 5).
        assert abs(one[step]["aux_loss"] - other[step]["aux_loss"]) <= 10 * LOSS_TOLERANCE
    base = load_file(str(tmp_path / "base/model.safetensors"))
    w1 = load_file(str(runs["one"] / "model/model.safetensors"))
    w2 = load_file(str(runs["launched"] / "model/model.safetensors"))
    # The two models differ by a small part of what training moved them (measured 1.3 %; the
    # largest differences are in the experts and the router, where the aux loss differs).
    moved = sum(((w1[k] - base[k]) ** 2).sum() for k in w1) ** 0.5
    assert sum(((w1[k] - w2[k]) ** 2).sum() for k in w1) ** 0.5 < 0.05 * moved
    return w1, w2


@pytest.mark.slow
def test_rft_on_two_ddp_processes_follows_the_single_process_loss_curve(tmp_path):
    """The MoE student, global batch 8: one process of 8 against two of 4 (accelerate launch,
    ddp.yaml, gloo). Same data order, same loss curve within LOSS_TOLERANCE (measured: README);
    the outputs are written once, by the main process."""
    runs = _rft_twins(tmp_path, DDP2)
    w1, w2 = _assert_twins(tmp_path, runs)
    assert w1.keys() == w2.keys()
    out = runs["launched"]
    assert {"model", "metrics.json", "train_log.csv"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "model/meta.json").read_text())["config"]["launcher"] == DDP2
    assert not [p for p in out.rglob(".*.tmp")]  # no other process left a temporary file behind


@pytest.mark.slow
def test_grpo_on_two_ddp_processes_draws_and_learns_as_one_process(tmp_path):
    """A 2-step GRPO smoke on two processes: the completions' seeds come from their global index,
    so both runs sample the same completions, score the same rewards and take the same steps."""
    rows = examples(4, 4)
    policy = tiny_model(tmp_path / "policy", TINY_MOE, rows)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logs = {}
    for name, launcher in (("one", {}), ("ddp", DDP2)):
        params = tmp_path / f"params_{name}.yaml"
        params.write_text(yaml.safe_dump({"base": {"seed": 0}, "grpo": {
            "max_steps": 2, "num_generations": 2, "prompts_per_step": 2, "max_prompts": 8,
            "max_completion_length": 12, "ref_samples": 1, "learning_rate": 0.01, "threads": 1,
            "launcher": launcher}}))
        out = tmp_path / f"out_{name}"
        proc = _run("steps.grpo", ["--params", str(params), "--data", str(tmp_path / "train.jsonl"),
                                   "--rft", str(policy), "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("grpo: {") == 1
        logs[name] = _losses(out / "train_log.csv")
        assert (out / "model/model.safetensors").exists() and (out / "ref_lengths.jsonl").exists()
    one, ddp = logs["one"], logs["ddp"]
    assert 1 in one and sorted(one) == sorted(ddp)
    for key in ("reward", "completions/mean_length", "num_tokens"):
        assert one[1][key] == pytest.approx(ddp[1][key], abs=1e-6), key
    # The policy's mean entropy over the sampled completion tokens: the same tokens give the same
    # value (measured 5e-7 apart); other draws of 8 x 12 tokens would be ~1e-2 apart.
    assert one[1]["entropy"] == pytest.approx(ddp[1]["entropy"], abs=1e-5)
    assert one[1]["loss"] == pytest.approx(ddp[1]["loss"], abs=LOSS_TOLERANCE)


# --- sharded training on two CPU processes: FSDP, ZeRO-2, ZeRO-3 ------------------------------------

def _sharded_run(config: str, args: list[str], probes: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` of the rft stage on two CPU processes through tests/sharded_cpu.py."""
    env = {**os.environ, "PIPELINE_TRACKING": "off", "OMP_NUM_THREADS": "1", launch.LAUNCHED_ENV: "1",
           "PYTHONPATH": str(ROOT), "SHARD_PROBE_DIR": str(probes)}
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                           "--num_processes", "2", "tests/sharded_cpu.py", "steps.rft", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _check_sharding(probe: dict, config: str) -> None:
    """What each process held: half of every parameter (FSDP, ZeRO-3) or of the optimiser state
    (ZeRO-2), as the config says."""
    if config == "fsdp":
        assert probe["kind"] == "fsdp" and probe["class"].startswith("FSDP")
        for name, p in probe["params"].items():
            assert p["sharded"] and p["local_shape"][0] * 2 == p["full_shape"][0], name
        experts = probe["params"]["model.layers.0.mlp.experts.gate_up_proj"]
        assert experts["local_shape"][0] == TINY_MOE["num_experts"] // 2  # sharded by expert
        return
    n, stage = probe["param_numel"], int(config[-1])
    assert probe["kind"] == "deepspeed" and probe["stage"] == stage
    # each flat partition is padded to a multiple of the processes: a few elements over half
    assert n / 2 <= probe["optimizer_numel_held"] <= n / 2 + 64
    if stage == 3:
        assert n / 2 <= probe["param_numel_held"] <= n / 2 + 64
    else:
        assert probe["param_numel_held"] == n  # ZeRO-2 keeps the parameters whole


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp", "zero2", "zero3"])
def test_sharded_rft_on_two_cpu_processes_trains_and_saves_a_model_that_evaluates_as_its_twin(tmp_path, config):
    """The rft stage under infra/accelerate/<config>.yaml on two CPU processes (gloo) against one
    plain process, the same global batch. FSDP needs tests/sharded_cpu.py to take accelerate's one
    GPU-only decision; DeepSpeed runs as it is. Each process holds half of what the config shards,
    the loss curve is the twin's within LOSS_TOLERANCE, the gathered model is the twin's within a
    small part of what training moved it, and both evaluate to the same responses."""
    from steps.evaluate import EvaluateConfig, evaluate_model

    probes = tmp_path / "probes"
    probes.mkdir()
    runs = _rft_twins(tmp_path, {"config": f"infra/accelerate/{config}.yaml", "num_processes": 2},
                         lambda args: _sharded_run(f"infra/accelerate/{config}.yaml", args, probes))
    for rank in (0, 1):  # written only where the sharding engine prepared the model
        _check_sharding(json.loads((probes / f"rank{rank}.json").read_text()), config)
    w1, w2 = _assert_twins(tmp_path, runs)
    # FSDP's and ZeRO-2's gathered state dicts also write the tied output layer (the embedding's
    # own values); from_pretrained ties it again.
    assert set(w1) <= set(w2) and set(w2) - set(w1) <= {"lm_head.weight"}
    if "lm_head.weight" in w2:
        assert (w2["lm_head.weight"] == w2["model.embed_tokens.weight"]).all()
    rows = [json.loads(line) for line in (tmp_path / "train.jsonl").read_text().splitlines()]
    cfg = EvaluateConfig(max_new_tokens=16, latency_probe_n=0, backend_options={"batch_size": 16})
    preds = {name: evaluate_model(cfg, name, str(out / "model"), rows, tmp_path / f"eval_{name}")[0]
             for name, out in runs.items()}
    keys = ("id", "response", "completion_tokens", "correct", "helpful")
    assert [[p[k] for k in keys] for p in preds["one"]] == [[p[k] for k in keys] for p in preds["launched"]]
    assert (runs["launched"] / "model/flops_profile.json").exists()  # the main process's reload after training
    assert json.loads((runs["launched"] / "model/meta.json").read_text())["config"]["launcher"]["config"] == \
        f"infra/accelerate/{config}.yaml"


# --- FSDP on GPUs, through the stage's own launcher ----------------------------------------------

@pytest.mark.slow
@pytest.mark.gpu
def test_fsdp_trains_and_saves_a_model_that_decodes_as_its_unsharded_twin(tmp_path):
    """fsdp.yaml on every visible GPU against one plain process: the saved (gathered) weights are
    the twin's within tolerance and greedy decoding gives the same tokens."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not torch.cuda.is_available():
        pytest.skip("accelerate runs FSDP on GPUs only (on CPU it would silently train as DDP)")
    n = torch.cuda.device_count()
    _, io_args = _rft_workspace(tmp_path)
    runs = {}
    for name, launcher in (("one", {}), ("fsdp", {"config": "infra/accelerate/fsdp.yaml", "num_processes": n})):
        params = tmp_path / f"params_{name}.yaml"
        params.write_text(yaml.safe_dump({"base": {"seed": 0}, "rft": {
            "max_steps": 5, "batch_size": 8 * n, "learning_rate": 0.01, "bf16": False, "launcher": launcher}}))
        out = tmp_path / f"out_{name}"
        proc = _run("steps.rft", ["--params", str(params), *io_args, "--out", str(out)])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = out / "model"
    w1, w2 = load_file(str(runs["one"] / "model.safetensors")), load_file(str(runs["fsdp"] / "model.safetensors"))
    assert w1.keys() == w2.keys() and max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-2
    tok = AutoTokenizer.from_pretrained(runs["one"])
    prompt = tok("<think>", return_tensors="pt")
    outs = [AutoModelForCausalLM.from_pretrained(d).generate(**prompt, max_new_tokens=8, do_sample=False)
            for d in runs.values()]
    assert outs[0].tolist() == outs[1].tolist()
