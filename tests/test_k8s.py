"""The Kubernetes target without a cluster: every manifest in infra/k8s/ and every Job the family
pools render (flow pods and stage jobs) validates against the Kubernetes schemas, strictly
(unknown fields are errors), with kubernetes-validate's bundled schemas (offline)."""
from __future__ import annotations

import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flows.docker_runner import FAMILIES
from flows.k8s import (FAMILY_RESOURCES, GPU_RESOURCE, WORKER_ONLY_POD_FIELDS, K8sRunnerConfig, base_job_template,
                       job_env, render_job, stage_job)
from steps.core.secrets import find_secrets

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
# The oldest minor a managed cluster still commonly runs, and the newest the validator knows.
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
STAGE_OF = {"light": "evaluate@rft", "train": "grpo", "vllm": "sample"}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _validate(doc: dict) -> None:
    for version in VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_is_offline_and_strict():
    # A Job that puts Job fields in its pod spec (as prefect-kubernetes' default template does)
    # is refused: the validator checks, it does not wave things through.
    bad = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"},
           "spec": {"template": {"spec": {"completions": 1, "restartPolicy": "Never",
                                          "containers": [{"name": "c", "image": "i"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="completions"):
        kubernetes_validate.validate(bad, VERSIONS[1], strict=True)
    gpu_as_word = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                   "spec": {"containers": [{"name": "c", "image": "i", "resources": {"limits": {GPU_RESOURCE: [8]}}}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gpu_as_word, VERSIONS[1], strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_infra_manifests_validate_and_hold_no_secret(path):
    docs = _docs(path)
    assert docs, path
    for doc in docs:
        _validate(doc)
        assert doc["metadata"].get("namespace", "livethinking") == "livethinking", doc["metadata"]
    # `$(POSTGRES_PASSWORD)` in a URL is Kubernetes' reference to an env var (from a Secret), not a value.
    assert find_secrets(list(yaml.safe_load_all(re.sub(r"\$\(\w+\)", "", path.read_text())))) == [], \
        f"{path.name}: a secret value or key in a manifest"
    # Passwords and keys only ever by reference (secretKeyRef / secretRef).
    text = path.read_text()
    assert "PASSWORD:" not in text and "SECRET_ACCESS_KEY:" not in text


def test_the_manifests_cover_the_services():
    kinds = {(d["kind"], d["metadata"]["name"]) for p in MANIFESTS for d in _docs(p)}
    for want in [("StatefulSet", "postgres"), ("StatefulSet", "minio"), ("Deployment", "mlflow"),
                 ("Deployment", "prefect-server"), ("Deployment", "prefect-worker"),
                 ("PersistentVolumeClaim", "livethinking-workspace"), ("ConfigMap", "livethinking-endpoints"),
                 ("Role", "livethinking-jobs")]:
        assert want in kinds, want
    worker = next(d for p in MANIFESTS for d in _docs(p) if d["metadata"]["name"] == "prefect-worker"
                  and d["kind"] == "Deployment")
    args = worker["spec"]["template"]["spec"]["containers"][0]["command"]
    assert args[args.index("--pool") + 1] == "livethinking-k8s-light" and args[args.index("--type") + 1] == "kubernetes"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_jobs_validate(family):
    template = base_job_template(family, f"livethinking/{family}:1.0")
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_SECRET_ACCESS_KEY": "not-in-the-job",
               "AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP", "PATH": "/usr/bin"}
    job = stage_job(STAGE_OF[family], template, K8sRunnerConfig(), environ, workspace=str(ROOT))
    _validate(job)
    pod = job["spec"]["template"]["spec"]
    box = pod["containers"][0]
    assert box["image"] == f"livethinking/{family}:1.0" and box["command"] == ["python", "-m"]
    assert box["args"][0] == f"steps.{STAGE_OF[family].split('@')[0]}"
    env = {e["name"]: e["value"] for e in box["env"]}
    # Secrets reach the pod from the Secret (envFrom), never as literal values in the Job.
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000" and not {"AWS_SECRET_ACCESS_KEY", "PATH"} & set(env)
    assert "AWS_ACCESS_KEY_ID" not in env  # an AWS key id by its shape
    assert {"secretRef": {"name": "livethinking-s3"}} in box["envFrom"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "livethinking-workspace"
    gpus = FAMILY_RESOURCES[family].gpus
    assert box["resources"]["limits"].get(GPU_RESOURCE) == (gpus or None)
    if family == "train":
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    if family == "light":
        assert "nodeSelector" not in pod and "tolerations" not in pod
    # Pool variables (runner.job_variables in params, a deployment's) change a family's size, within the schema.
    sized = render_job(template, {"gpu_count": 4, "cpu_request": "8"} if gpus else {"cpu_request": "8"})
    for key in WORKER_ONLY_POD_FIELDS:
        sized["spec"]["template"]["spec"].pop(key)
    _validate(sized)
    res = sized["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["cpu"] == "8" and res["limits"].get(GPU_RESOURCE) == (4 if gpus else None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_flow_pod_jobs_validate_but_for_the_workers_two_fields(family):
    """The flow pod's Job as the pool gives it. prefect-kubernetes' worker requires `completions`
    and `parallelism` inside the pod spec (it refuses a template without them); they are not pod
    fields, which the strict schema says, and the API server drops them with a warning."""
    job = render_job(base_job_template(family, f"livethinking/{family}:1.0"), {"command": "prefect flow-run execute"})
    with pytest.raises(kubernetes_validate.ValidationError, match="completions|parallelism"):
        kubernetes_validate.validate(job, VERSIONS[1], strict=True)
    pod = job["spec"]["template"]["spec"]
    assert {k: pod.pop(k) for k in WORKER_ONLY_POD_FIELDS} == {"completions": 1, "parallelism": 1}
    _validate(job)
    assert pod["containers"][0]["args"] == ["prefect", "flow-run", "execute"]


def test_job_env_drops_secrets():
    env = job_env({"OPENAI_API_KEY": "x", "HF_TOKEN": "y", "MLFLOW_TRACKING_URI": "http://m",
                   "MLFLOW_TRACKING_PASSWORD": "z", "S3_ENDPOINT_URL": "http://u:pw@minio:9000"})
    assert set(env) == {"MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED", "HOME"}


def test_runner_config_names_the_params_key():
    with pytest.raises(ValueError, match="runner.job_variables: unknown families"):
        K8sRunnerConfig(job_variables={"gpu": {}})
