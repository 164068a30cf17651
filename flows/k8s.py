"""The Kubernetes target: one Prefect work pool per stage family, and a runner that starts each
stage as a Kubernetes Job from its family's pool.

A work pool's base job template is the one place a family's Job is described (image, CPU and
memory, GPU request, node selector, tolerations, the shared workspace, where settings and
secrets come from), so it can be read and edited through the Prefect API or UI:

  livethinking-k8s-light  CPU stages (ingest, judge, evaluate, report, export, promote) and the
                          pipeline flow itself; the Prefect worker polls this pool
  livethinking-k8s-train  training stages: a GPU request and a GPU node selector + toleration
  livethinking-k8s-vllm   vLLM sampling and serving: a GPU request

Only the light pool has a worker. The other two are templates: with `runner: {kind: kubernetes}`
in params.yaml the flow (in its light pod) renders a stale stage's Job from its family's pool,
through prefect-kubernetes' own job configuration (the code the worker renders flow pods with),
starts it with prefect-kubernetes' KubernetesJob, streams its log into the Prefect task and then
records the outputs with `dvc commit`, as the Docker runner does. A stage pod cannot be a Prefect
flow run: the vllm image holds no Prefect (vLLM and Prefect pin incompatible web stacks).

Every pod mounts the workspace claim (a ReadWriteMany volume with the checkout, data/ and the
DVC cache) at /app, the images' working directory, as the Docker target mounts the checkout;
endpoints come from the ConfigMap `livethinking-endpoints` and S3 keys from the Secret
`livethinking-s3` (infra/k8s/): no secret value is in a template or a deployment.
No Kubernetes cluster was reachable where this was written: the templates are rendered and
validated against the Kubernetes schemas in tests, the runner's API calls were never run.
"""
from __future__ import annotations

import copy
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.docker_runner import FAMILIES, MOUNT_POINT, container_env, family_of, stage_command

POOL_PREFIX = "livethinking-k8s"
NAMESPACE = "livethinking"
SERVICE_ACCOUNT = "livethinking-jobs"
WORKSPACE_CLAIM = "livethinking-workspace"
ENDPOINTS_CONFIGMAP = "livethinking-endpoints"
S3_SECRET = "livethinking-s3"
GPU_RESOURCE = "nvidia.com/gpu"
WORKER_ONLY_POD_FIELDS = ("completions", "parallelism")


@dataclass(frozen=True)
class FamilyResources:
    """A family's default pod size; every field is a work-pool variable, so a deployment's
    job_variables or an edit of the pool can change it."""
    cpu_request: str
    memory_request: str
    memory_limit: str
    gpus: int = 0
    # GPU feature discovery's product label: a training job lands on the GPUs the capacity
    # plan assumes (bench/capacity.py), never on a smaller card where it would not fit.
    node_selector: dict = field(default_factory=dict)
    shm_size: str = "1Gi"  # /dev/shm: NCCL and torch data loaders need more than 64 MB


FAMILY_RESOURCES = {
    "light": FamilyResources(cpu_request="2", memory_request="8Gi", memory_limit="16Gi"),
    # One 8-GPU node: ZeRO-3 / FSDP over 8 GPUs holds a 30B-A3B student (bench/capacity.py).
    "train": FamilyResources(cpu_request="64", memory_request="900Gi", memory_limit="1600Gi", gpus=8,
                             node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, shm_size="64Gi"),
    # The student in bf16 (61 GB of weights) and the KV cache of a GRPO batch (512 sequences of
    # 3.5k tokens, 176 GB): tensor parallel over 4 GPUs (bench/capacity.py).
    "vllm": FamilyResources(cpu_request="16", memory_request="128Gi", memory_limit="256Gi", gpus=4,
                            shm_size="16Gi"),
}


def pool_name(family: str, prefix: str = POOL_PREFIX) -> str:
    return f"{prefix}-{family}"


def _var(title: str, default: Any, type_: str, description: str) -> dict[str, Any]:
    return {"title": title, "default": default, "type": type_, "description": description}


def base_job_template(family: str, image: str, namespace: str = NAMESPACE) -> dict[str, Any]:
    """The work pool's base job template for `family`: prefect-kubernetes' default variables
    (so the worker's own settings keep working) plus the family's, and our Job manifest."""
    from prefect_kubernetes.worker import KubernetesWorker

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {sorted(FAMILIES)}")
    res = FAMILY_RESOURCES[family]
    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    props = template["variables"]["properties"]
    props["image"]["default"] = image
    props["namespace"]["default"] = namespace
    props["service_account_name"]["default"] = SERVICE_ACCOUNT
    props["cpu_request"]["default"] = res.cpu_request
    props["memory_request"]["default"] = res.memory_request
    props["memory_limit"]["default"] = res.memory_limit
    props["finished_job_ttl"]["default"] = 86400  # a day to read a failed pod's state
    props["labels"]["default"] = {"app.kubernetes.io/part-of": "livethinking", "livethinking.io/family": family}
    props["workspace_claim"] = _var("Workspace claim", WORKSPACE_CLAIM, "string",
                                    f"ReadWriteMany claim with the checkout, data/ and the DVC cache, mounted at {MOUNT_POINT}")
    props["shm_size"] = _var("Shared memory", res.shm_size, "string", "size of the in-memory /dev/shm")
    container: dict[str, Any] = {
        "name": "prefect-job",
        "image": "{{ image }}",
        "imagePullPolicy": "{{ image_pull_policy }}",
        # The images' ENTRYPOINT, spelled out: flow pods get `prefect flow-run execute` as args
        # (python -m prefect ...), stage jobs `steps.<stage> ...` from dvc.yaml.
        "command": ["python", "-m"],
        "args": "{{ command }}",
        "workingDir": MOUNT_POINT,
        "env": "{{ env }}",
        # Endpoints and S3 keys by reference: their values live in the cluster, not here.
        "envFrom": [{"configMapRef": {"name": ENDPOINTS_CONFIGMAP}},
                    {"secretRef": {"name": S3_SECRET}}],
        "resources": {"requests": {"cpu": "{{ cpu_request }}", "memory": "{{ memory_request }}"},
                      "limits": {"memory": "{{ memory_limit }}"}},
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 10001},
        "volumeMounts": [{"name": "workspace", "mountPath": MOUNT_POINT}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    pod: dict[str, Any] = {
        # prefect-kubernetes' worker refuses a flow-pod template without these two, here in the
        # pod spec (where its own default template has them), though they are Job fields: the API
        # server drops unknown fields with a warning (fieldValidation defaults to Warn). Stage
        # Jobs, which the runner starts, go without them (WORKER_ONLY_POD_FIELDS).
        "completions": 1,
        "parallelism": 1,
        "restartPolicy": "Never",
        "serviceAccountName": "{{ service_account_name }}",
        # Workspace files written by a stage belong to the image user's group, so every family can read them.
        "securityContext": {"fsGroup": 10001},
        "containers": [container],
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "{{ workspace_claim }}"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "{{ shm_size }}"}}],
    }
    if res.gpus:
        props["gpu_count"] = _var("GPUs", res.gpus, "integer", f"{GPU_RESOURCE} per pod")
        props["node_selector"] = _var("Node selector", res.node_selector, "object", "labels the GPU node must carry")
        # Extended resources are set as limits only (the request defaults to the limit).
        container["resources"]["limits"][GPU_RESOURCE] = "{{ gpu_count }}"
        pod["nodeSelector"] = "{{ node_selector }}"
        # GPU nodes are usually tainted so that CPU work stays off them.
        pod["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    template["job_configuration"]["job_manifest"] = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"generateName": "{{ name }}-", "namespace": "{{ namespace }}",
                     "labels": "{{ labels }}", "annotations": "{{ annotations }}"},
        "spec": {"backoffLimit": "{{ backoff_limit }}", "ttlSecondsAfterFinished": "{{ finished_job_ttl }}",
                 "template": {"metadata": {"labels": "{{ labels }}"}, "spec": pod}},
    }
    return template


def render_job(template: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The Job manifest `template` gives for `values` (work-pool variables over their defaults),
    filled by Prefect's own templating; env as a Kubernetes list, args as a list. (The worker
    renders flow pods the same way, and also resolves block references, which need a server.)"""
    from prefect.utilities.templating import apply_values

    props = template["variables"].get("properties", {})
    filled = {k: p["default"] for k, p in props.items() if "default" in p}
    filled.update(values)
    manifest = apply_values(copy.deepcopy(template["job_configuration"]["job_manifest"]), filled)
    box = manifest["spec"]["template"]["spec"]["containers"][0]
    box["env"] = [{"name": k, "value": str(v)} for k, v in (box.get("env") or {}).items()]
    if isinstance(box.get("args"), str):
        box["args"] = box["args"].split()
    return manifest


def _slug(stage: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", stage.lower()).strip("-")[:40]


def job_name(stage: str) -> str:
    """A DNS-1123 name, unique per start: `evaluate@rft` -> lt-evaluate-rft-1a2b3c4d."""
    return f"lt-{_slug(stage)}-{uuid.uuid4().hex[:8]}"


def job_env(environ: dict[str, str]) -> dict[str, str]:
    """What a stage Job gets as literal env: the Docker runner's pass-through, less anything
    secret by name or shape. A Job's spec is readable by whoever may list jobs; the pod gets
    its keys from the Secret instead (envFrom)."""
    from steps.core.secrets import secret_key, secret_value

    return {k: v for k, v in container_env(environ).items() if not (secret_key(k) or secret_value(v))}


@dataclass(frozen=True)
class K8sRunnerConfig:
    pool_prefix: str = POOL_PREFIX
    dvc_yaml: str = "dvc.yaml"
    timeout_s: int | None = None  # None: wait as long as the stage runs
    job_variables: dict = field(default_factory=dict)  # family -> work-pool variables to override

    def __post_init__(self) -> None:
        unknown = sorted(set(self.job_variables) - set(FAMILIES))
        if unknown:
            raise ValueError(f"params.yaml: runner.job_variables: unknown families {unknown}; known: {sorted(FAMILIES)}")


def stage_job(stage: str, template: dict[str, Any], cfg: K8sRunnerConfig, environ: dict[str, str],
              workspace: str = ".") -> dict[str, Any]:
    """The Job manifest that runs `stage` from its family's pool template (plain data)."""
    family = family_of(stage)
    values = {**cfg.job_variables.get(family, {}), "env": job_env(environ), "name": job_name(stage)}
    manifest = render_job(template, values)
    pod = manifest["spec"]["template"]["spec"]
    for key in WORKER_ONLY_POD_FIELDS:
        pod.pop(key, None)
    # The stage's own dvc.yaml command as a list: no word splitting of its arguments.
    pod["containers"][0]["args"] = stage_command(stage, Path(workspace) / cfg.dvc_yaml)
    meta = manifest["metadata"]
    meta["name"] = values["name"]  # KubernetesJobRun follows the job by name
    meta.pop("generateName", None)
    meta["labels"] = {**(meta.get("labels") or {}), "livethinking.io/stage": _slug(stage)}
    return manifest


def run_stage_job(stage: str, cfg: K8sRunnerConfig = K8sRunnerConfig(), log: Callable[[str], Any] = print,
                  environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Start `stage` as a Job from its family's pool and wait for it (NOT RUN here: no cluster).
    Raises RuntimeError (prefect-kubernetes' own) when the Job fails."""
    from prefect.client.orchestration import get_client
    from prefect_kubernetes.jobs import KubernetesJob

    pool = pool_name(family_of(stage), cfg.pool_prefix)
    with get_client(sync_client=True) as client:
        template = client.read_work_pool(pool).base_job_template
    manifest = stage_job(stage, template, cfg, dict(os.environ if environ is None else environ))
    job = KubernetesJob(v1_job=manifest, namespace=manifest["metadata"]["namespace"],
                        timeout_seconds=cfg.timeout_s, delete_after_completion=True)
    log(f"{stage} | job {manifest['metadata']['name']} from pool {pool}")
    job.trigger().wait_for_completion(print_func=lambda line: log(f"{stage} | {line}"))
    return {"stage": stage, "job": manifest["metadata"]["name"], "pool": pool}
