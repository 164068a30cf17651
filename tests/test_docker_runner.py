"""flows.docker_runner: the pure helpers without a daemon; a real container run in the light
image (built by the `images` fixture, tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from flows.docker_runner import (FAMILIES, DockerRunnerConfig, LineSplitter, StageContainerFailed, container_env,
                                 family_of, gpu_request, image_for, run_kwargs, run_stage_container, stage_command)

ROOT = Path(__file__).resolve().parents[1]


def test_every_dvc_stage_has_a_family_and_a_container_command():
    from flows.docker_runner import resolved_stages
    from steps.core.registry import load_registry
    stages = resolved_stages(ROOT / "dvc.yaml")
    # foreach stages come expanded, one per registry row
    assert {f"evaluate@{name}" for name in load_registry(ROOT / "params.yaml")} <= set(stages)
    for stage in stages:
        assert family_of(stage) in FAMILIES
        cmd = stage_command(stage, ROOT / "dvc.yaml")
        assert cmd[0] == f"steps.{stage.split('@')[0]}" and all("\n" not in w for w in cmd)
    # the folded multi-line cmd of grpo comes out as one argv; evaluate@rft's template is filled in
    assert stage_command("grpo", ROOT / "dvc.yaml")[-2:] == ["--out", "data/grpo"]
    ev = stage_command("evaluate@rft", ROOT / "dvc.yaml")
    assert ev[ev.index("--model") + 1] == "rft" and ev[-2:] == ["--out", "data/evaluate/rft"]
    assert family_of("evaluate@rft") == "light" and family_of("a_new_method") == "train"


def test_images_and_errors(tmp_path):
    images = {"light": "l:1", "train": "t:1", "vllm": "v:1"}
    assert [image_for(s, images) for s in ("promote", "grpo", "sample")] == ["l:1", "t:1", "v:1"]
    bad = tmp_path / "dvc.yaml"
    bad.write_text("stages:\n  judge: {cmd: bash -c 'rm -rf /'}\n")
    with pytest.raises(ValueError, match=r"stages.judge.cmd must start with `python -m steps.judge`"):
        stage_command("judge", bad)
    with pytest.raises(ValueError, match="no stage 'rft'"):
        stage_command("rft", bad)
    with pytest.raises(ValueError, match=r"no image for stage families \['vllm'\]"):
        DockerRunnerConfig(images={"light": "l", "train": "t"})


def test_env_selection():
    env = container_env({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k", "PATH": "/x",
                         "HOME": "/root", "S3_ENDPOINT_URL": "http://s3", "SECRET": "s"}, {"PIPELINE_TRACKING": "on"})
    assert env == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_ACCESS_KEY_ID": "k",
                   "S3_ENDPOINT_URL": "http://s3", "PYTHONUNBUFFERED": "1", "HOME": "/tmp", "PIPELINE_TRACKING": "on"}


def test_gpu_requests_only_for_gpu_families():
    assert gpu_request(None) is None
    assert gpu_request("all") == {"count": -1, "capabilities": [["gpu"]]}
    assert gpu_request("0, 2") == {"device_ids": ["0", "2"], "capabilities": [["gpu"]]}
    cfg = DockerRunnerConfig(workspace=str(ROOT), gpus="all")
    train = run_kwargs("rft", cfg, {}, uid_gid="1000:1000")
    light = run_kwargs("export", cfg, {}, uid_gid="1000:1000")
    assert train["device_requests"] == [{"count": -1, "capabilities": [["gpu"]]}] and light["device_requests"] == []
    assert train["image"] == "livethinking/train:latest" and train["network_mode"] == "host"
    assert train["volumes"] == {str(ROOT): {"bind": "/app", "mode": "rw"}} and train["working_dir"] == "/app"
    assert train["user"] == "1000:1000" and train["command"][:3] == ["steps.rft", "--data", "data/ingest/train.jsonl"]
    assert "user" not in run_kwargs("rft", DockerRunnerConfig(workspace=str(ROOT), user=None), {})
    # A launched stage (params `launcher`) starts accelerate launch inside its container: it gets the
    # GPUs, the same `python -m steps.<stage>` command, and the launcher's environment.
    grpo = run_kwargs("grpo", cfg, {"NCCL_DEBUG": "INFO", "ACCELERATE_LOG_LEVEL": "info", "MASTER_PORT": "1"})
    assert grpo["device_requests"] == train["device_requests"] and grpo["command"][0] == "steps.grpo"
    assert {"NCCL_DEBUG": "INFO", "ACCELERATE_LOG_LEVEL": "info"}.items() <= grpo["environment"].items()
    assert "MASTER_PORT" not in grpo["environment"] and grpo["shm_size"] == "8g"


def test_line_splitter():
    s = LineSplitter()
    got = list(s.feed(b"first li")) + list(s.feed(b"ne\nprogress 1%\rprogress 50%\rprogress 100%\n\nla"))
    got += list(s.feed("st \xe2\x9c\x93".encode("latin-1"))) + list(s.flush())
    assert got == ["first line", "progress 100%", "last \u2713"]


@pytest.mark.slow
@pytest.mark.docker
def test_stage_runs_in_its_container_and_failures_carry_the_log(tmp_path, engine, images):
    image, client = images["light"], engine
    ws = tmp_path / "ws"
    shutil.copytree(ROOT / "steps", ws / "steps", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / f, ws / f)
    (ws / "data/export").mkdir(parents=True)
    (ws / "data/export/registry.json").write_text(json.dumps({"model_name": "m", "version": None}))
    cfg = DockerRunnerConfig(workspace=str(ws), images={"light": image, "train": image, "vllm": image})
    lines: list[str] = []
    out = run_stage_container("promote", cfg, log=lines.append, client=client, environ={"PIPELINE_TRACKING": "off"})
    assert out["exit_code"] == 0
    decision = ws / "data/promote/decision.json"
    assert json.loads(decision.read_text())["action"] == "skipped"
    assert decision.stat().st_uid == os.getuid()  # written as the calling user, not the image's
    assert any(line.startswith("promote | promote: m vNone: skipped") for line in lines), lines

    (ws / "data/export/registry.json").unlink()
    with pytest.raises(StageContainerFailed) as err:
        run_stage_container("promote", cfg, log=lines.append, client=client, environ={"PIPELINE_TRACKING": "off"})
    assert err.value.exit_code == 1 and "registry.json: file not found" in str(err.value)
    assert not client.containers.list(all=True, filters={"label": "livethinking.stage=promote"})
