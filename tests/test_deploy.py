"""flows.deploy: specs without a server; then a real `prefect server`, a process work pool, a
cron deployment of a tiny flow, the server's scheduler creating its run and a worker running it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.deploy import DeploySpec, spec_for
from tests.helpers import free_port

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))

TINY_FLOW = '''
from pathlib import Path
from prefect import flow

@flow(name="tiny-nightly")
def tiny(marker: str, greeting: str = "hello") -> str:
    Path(marker).write_text(greeting)
    return greeting
'''


def test_specs():
    local = spec_for("local", environ={"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "AWS_SECRET_ACCESS_KEY": "x"})
    assert (local.pool_type, local.cron, local.entrypoint) == ("process", "0 2 * * *", "flows/pipeline.py:pipeline")
    assert local.job_variables["env"] == {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}  # no secrets pinned
    prod = spec_for("production", environ={}, image="livethinking/light:1.0", workspace="/srv/lt", cron="0 3 * * 1")
    assert prod.pool_type == "docker" and prod.cron == "0 3 * * 1"
    assert prod.job_variables["network_mode"] == "host" and "/srv/lt:/app" in prod.job_variables["volumes"]
    with pytest.raises(ValueError, match="5 fields"):
        DeploySpec(cron="nightly")
    with pytest.raises(ValueError, match="needs an image"):
        DeploySpec(pool_type="docker")
    k8s = spec_for("kubernetes", environ={"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, image_tag="1.0")
    assert (k8s.pool_type, k8s.work_pool, k8s.image) == ("kubernetes", "livethinking-k8s-light", "livethinking/light:1.0")
    assert sorted(k8s.pool_templates) == ["livethinking-k8s-light", "livethinking-k8s-train", "livethinking-k8s-vllm"]
    assert k8s.parameters["runner"] == {"kind": "kubernetes", "pool_prefix": "livethinking-k8s"}


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Own session: teardown signals the whole process group (server services, flow-run children).
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Children that outlived their leader are still in the group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    import httpx

    tmp = tmp_path_factory.mktemp("prefect")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "home"), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "10",
           "PYTHONPATH": str(ROOT)}
    server = _start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env, tmp / "server.log")
    try:
        # 180 s: on 2 shared cores under a training job the server's start has taken over 90 s.
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start:\n{(tmp / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield env, tmp
    finally:
        _stop(server)


def _deploy(env: dict[str, str], *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "flows.deploy", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cron_deployment_is_scheduled_and_run_by_a_process_worker(prefect_server):
    import httpx

    env, tmp = prefect_server
    api = env["PREFECT_API_URL"]
    src = tmp / "src"
    src.mkdir()
    (src / "tiny_flow.py").write_text(TINY_FLOW)
    marker = tmp / "ran.txt"
    out = _deploy(env, "--target", "local", "--source", str(src), "--entrypoint", "tiny_flow.py:tiny",
                  "--name", "tiny-nightly", "--work-pool", "test-process", "--cron", "* * * * *",
                  "--param", f"marker={marker}", "--param", "greeting=nightly")
    dep = httpx.get(f"{api}/deployments/{out['deployment_id']}").json()
    assert dep["work_pool_name"] == "test-process"
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["* * * * *"] and dep["schedules"][0]["active"]
    assert dep["parameters"] == {"marker": str(marker), "greeting": "nightly"}

    # The production target registers against a docker pool (nothing runs: paused, no worker).
    prod = _deploy(env, "--target", "production", "--image", "livethinking/light:test", "--workspace", "/srv/lt",
                   "--work-pool", "test-docker", "--paused")
    pdep = httpx.get(f"{api}/deployments/{prod['deployment_id']}").json()
    assert pdep["entrypoint"] == "flows/pipeline.py:pipeline" and pdep["job_variables"]["image"] == "livethinking/light:test"
    assert httpx.get(f"{api}/work_pools/test-docker").json()["type"] == "docker"

    worker = _start([PREFECT, "worker", "start", "--pool", "test-process", "--type", "process", "--limit", "1"],
                    env, tmp / "worker.log")
    try:
        deadline = time.monotonic() + 150  # the next minute boundary, then the run itself
        runs: list[dict] = []
        while time.monotonic() < deadline:
            runs = httpx.post(f"{api}/flow_runs/filter", json={
                "flow_runs": {"deployment_id": {"any_": [out["deployment_id"]]}}}).json()
            if any(r["state_type"] == "COMPLETED" for r in runs):
                break
            assert worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
            time.sleep(2)
        done = [r for r in runs if r["state_type"] == "COMPLETED"]
        assert done, f"no completed run; runs: {[(r['name'], r['state_type']) for r in runs]}\n" \
                     + (tmp / "worker.log").read_text()[-3000:]
        run = done[0]
        assert run["auto_scheduled"], "the run should come from the server's scheduler, not a manual trigger"
        assert run["expected_start_time"].split(":")[2].startswith("00"), run["expected_start_time"]
        assert run["parameters"]["greeting"] == "nightly"
        assert marker.read_text() == "nightly"
    finally:
        _stop(worker)


@pytest.mark.slow
def test_kubernetes_target_creates_the_family_pools_and_the_deployment(prefect_server):
    """No cluster here: the pools and the deployment are read back through the Prefect API, and
    the flow pod the worker would start is rendered by prefect-kubernetes' own job configuration
    from the pool as stored, then validated against the Kubernetes schemas."""
    import httpx
    import kubernetes_validate
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    from flows.k8s import WORKER_ONLY_POD_FIELDS

    env, _ = prefect_server
    api = env["PREFECT_API_URL"]
    out = _deploy(env, "--target", "kubernetes", "--image-tag", "1.0", "--work-pool", "test-k8s", "--paused")
    assert out["work_pool"] == "test-k8s-light"
    dep = httpx.get(f"{api}/deployments/{out['deployment_id']}").json()
    assert dep["entrypoint"] == "flows/pipeline.py:pipeline" and dep["work_pool_name"] == "test-k8s-light"
    assert dep["job_variables"]["image"] == "livethinking/light:1.0"
    assert dep["parameters"]["runner"] == {"kind": "kubernetes", "pool_prefix": "test-k8s"}
    pools = {f: httpx.get(f"{api}/work_pools/test-k8s-{f}").json() for f in ("light", "train", "vllm")}
    for family, pool in pools.items():
        assert pool["type"] == "kubernetes", pool
        props = pool["base_job_template"]["variables"]["properties"]
        assert props["image"]["default"] == f"livethinking/{family}:1.0"
        box = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert box["envFrom"][1] == {"secretRef": {"name": "livethinking-s3"}}
    train, vllm = (pools[f]["base_job_template"] for f in ("train", "vllm"))
    assert train["variables"]["properties"]["gpu_count"]["default"] == 8
    assert train["variables"]["properties"]["node_selector"]["default"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert vllm["variables"]["properties"]["gpu_count"]["default"] == 4
    assert "gpu_count" not in pools["light"]["base_job_template"]["variables"]["properties"]

    # Deploying again updates the pools' templates from the code (here: a new image tag).
    _deploy(env, "--target", "kubernetes", "--image-tag", "1.1", "--work-pool", "test-k8s", "--paused")
    stored = httpx.get(f"{api}/work_pools/test-k8s-train").json()["base_job_template"]
    assert stored["variables"]["properties"]["image"]["default"] == "livethinking/train:1.1"

    # The flow pod, as the worker renders it for a run of this deployment (job variables over the pool's).
    light = httpx.get(f"{api}/work_pools/test-k8s-light").json()["base_job_template"]
    with temporary_settings(updates={PREFECT_API_URL: api}):  # the server, not an ephemeral one
        cfg = run_coro_as_sync(KubernetesWorkerJobConfiguration.from_template_and_values(light, dep["job_variables"]))
        cfg.prepare_for_flow_run(FlowRun(flow_id=dep["flow_id"], name="nightly-1", deployment_id=dep["id"]))
    job = cfg.job_manifest
    # The two fields the worker insists on in the pod spec (tests/test_k8s.py says why), then strict.
    assert [job["spec"]["template"]["spec"].pop(k) for k in WORKER_ONLY_POD_FIELDS] == [1, 1]
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
    box = job["spec"]["template"]["spec"]["containers"][0]
    assert box["image"] == "livethinking/light:1.0"
    assert box["command"] + box["args"] == ["python", "-m", "prefect", "flow-run", "execute"]
    assert {e["name"] for e in box["env"]} >= {"PREFECT__FLOW_RUN_ID", "PREFECT_API_URL"}
