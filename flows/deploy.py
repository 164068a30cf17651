"""Scheduled deployments of the pipeline flow: the nightly retrain, locally and in production.

A Python module rather than prefect.yaml: the two targets share one spec (name, cron,
parameters) and differ only in work pool and job variables, which is a few lines of data
here and would be two copied YAML blocks there; the spec is a frozen dataclass that tests
build and check without a server, and `--source/--entrypoint` let the same code deploy any
flow (the test deploys a tiny one).

Targets:
  local       a `process` work pool; the worker runs the flow in this checkout, in its venv.
                  prefect worker start --pool livethinking-process
  production  a `docker` work pool (worker needs `pip install prefect-docker`); the flow runs
              in the light image with the workspace checkout mounted at /app (code, dvc.yaml,
              data and DVC cache come from the checkout; the image gives the environment) and
              the Docker socket mounted, so that stages can run in their own containers
              (flows/docker_runner.py). Network mode host: MLflow, S3 and Prefect are reached
              at the same URLs as on the host. Secrets (AWS keys) are not stored in the
              deployment: give them to the worker host's Docker daemon environment or a
              Prefect Secret block.
  kubernetes  three `kubernetes` work pools, one per stage family (flows/k8s.py: light, train
              with a GPU request and node selector, vllm with a GPU request), each with its
              base job template and its family's image (--image-tag); the flow runs in the
              light pool (worker: infra/k8s/prefect.yaml, `prefect-kubernetes`) with
              `runner: {kind: kubernetes}`, so each stale stage runs as a Job from its
              family's pool. The workspace volume, the endpoints ConfigMap and the S3 Secret
              are the cluster's (infra/k8s/); the deployment holds no secret.

    python -m flows.deploy --target local                      # nightly at 02:00 UTC
    python -m flows.deploy --target production --image livethinking/light:1.0 --workspace /srv/lt
    python -m flows.deploy --target local --cron "*/30 * * * *" --param force=true
    python -m flows.deploy --target kubernetes --image-tag 1.0     # livethinking/{light,train,vllm}:1.0
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Endpoints (not secrets) a flow run needs; copied from the deploying shell into the deployment.
ENV_TO_PIN = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ENDPOINT_URL",
              "AWS_DEFAULT_REGION", "MLFLOW_EXPERIMENT_NAME", "PIPELINE_TRACKING")


@dataclass(frozen=True)
class DeploySpec:
    name: str = "nightly-retrain"
    source: str = str(ROOT)
    entrypoint: str = "flows/pipeline.py:pipeline"
    cron: str = "0 2 * * *"
    timezone: str = "UTC"
    parameters: dict = field(default_factory=lambda: {"stages": None, "force": False})
    work_pool: str = "livethinking-process"
    pool_type: str = "process"
    image: str | None = None
    job_variables: dict = field(default_factory=dict)
    # Further pools to create or update first, name -> base job template (the stage families').
    pool_templates: dict = field(default_factory=dict)
    tags: tuple[str, ...] = ("livethinking", "nightly")
    paused: bool = False

    def __post_init__(self) -> None:
        if self.pool_type not in ("process", "docker", "kubernetes"):
            raise ValueError(f"pool_type {self.pool_type!r}: expected 'process', 'docker' or 'kubernetes'")
        if self.pool_type in ("docker", "kubernetes") and not self.image:
            raise ValueError(f"a {self.pool_type} work pool needs an image (--image livethinking/light:<tag>)")
        if len(self.cron.split()) != 5:
            raise ValueError(f"cron {self.cron!r}: expected 5 fields (minute hour day month weekday)")
        if ":" not in self.entrypoint:
            raise ValueError(f"entrypoint {self.entrypoint!r}: expected path/to/file.py:flow_function")


def pinned_env(environ: dict[str, str]) -> dict[str, str]:
    return {k: environ[k] for k in ENV_TO_PIN if environ.get(k)}


def spec_for(target: str, environ: dict[str, str] | None = None, image: str | None = None,
             workspace: str | None = None, image_tag: str | None = None, image_repo: str | None = None,
             **overrides: Any) -> DeploySpec:
    """The deployment for `target` (local | production | kubernetes); non-None overrides replace
    spec fields (kubernetes: --work-pool is the prefix of the three family pools)."""
    environ = dict(os.environ if environ is None else environ)
    env = pinned_env(environ)
    if target == "local":
        # working_dir: the flow-run process starts in the source folder, so `import steps` works.
        base = DeploySpec(job_variables={"env": env, "working_dir": overrides.get("source") or str(ROOT)})
    elif target == "production":
        workspace = workspace or environ.get("LIVETHINKING_WORKSPACE", "/srv/livethinking")
        image = image or environ.get("LIVETHINKING_IMAGE", "livethinking/light:latest")
        base = DeploySpec(work_pool="livethinking-docker", pool_type="docker", image=image, job_variables={
            "image": image, "network_mode": "host", "auto_remove": True, "stream_output": True,
            "volumes": [f"{workspace}:/app", "/var/run/docker.sock:/var/run/docker.sock"],
            "env": {**env, "PIPELINE_RUNNER": "docker", "LIVETHINKING_WORKSPACE": workspace}})
    elif target == "kubernetes":
        from flows.k8s import FAMILIES, base_job_template, pool_name

        tag = image_tag or environ.get("LIVETHINKING_IMAGE_TAG", "latest")
        repo = image_repo or environ.get("LIVETHINKING_IMAGE_REPO", "livethinking")  # e.g. registry.example/lt
        images = {f: f"{repo}/{f}:{tag}" for f in FAMILIES}
        images["light"] = image or images["light"]
        prefix = overrides.get("work_pool") or "livethinking-k8s"
        pools = {pool_name(f, prefix): base_job_template(f, images[f]) for f in FAMILIES}
        # The flow's own pod: the light pool's template, env pinned like the other targets.
        base = DeploySpec(work_pool=pool_name("light", prefix), pool_type="kubernetes", image=images["light"],
                          job_variables={"image": images["light"], "env": env}, pool_templates=pools,
                          parameters={"stages": None, "force": False,
                                      "runner": {"kind": "kubernetes", "pool_prefix": prefix}})
        overrides = {k: v for k, v in overrides.items() if k != "work_pool"}
    else:
        raise ValueError(f"target {target!r}: expected 'local', 'production' or 'kubernetes'")
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def ensure_work_pool(name: str, pool_type: str, template: dict | None = None) -> None:
    """Create the work pool if it is missing, with `template` or the worker type's default job
    template; an existing pool gets `template` when one is given (the code is its source)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    with get_client(sync_client=True) as client:
        try:
            pool = client.read_work_pool(name)
        except ObjectNotFound:
            if template is None:
                template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type(pool_type)) or {}
            client.create_work_pool(WorkPoolCreate(name=name, type=pool_type, base_job_template=template))
            return
        if pool.type != pool_type:
            raise ValueError(f"work pool {name!r} exists with type {pool.type!r}, not {pool_type!r}; "
                             "pick another --work-pool name")
        if template is not None:
            client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))


@contextlib.contextmanager
def _cwd(path: str) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def deploy(spec: DeploySpec) -> str:
    """Create or update the deployment; returns its id. Its schedule is active at once."""
    from prefect import flow
    from prefect.flows import load_flow_from_entrypoint
    from prefect.schedules import Cron

    for name, template in spec.pool_templates.items():
        ensure_work_pool(name, spec.pool_type, template)
    ensure_work_pool(spec.work_pool, spec.pool_type, spec.pool_templates.get(spec.work_pool))
    common: dict[str, Any] = dict(
        name=spec.name, work_pool_name=spec.work_pool, schedules=[Cron(spec.cron, timezone=spec.timezone)],
        parameters=spec.parameters, job_variables=spec.job_variables, tags=list(spec.tags), paused=spec.paused,
        description=f"{spec.entrypoint} on cron {spec.cron!r} ({spec.timezone})", print_next_steps=False)
    if spec.pool_type == "process":
        # The worker runs the flow where the source is (a pull step sets the working directory).
        return str(flow.from_source(source=spec.source, entrypoint=spec.entrypoint).deploy(**common))
    # Docker and Kubernetes: no pull step; the entrypoint (relative to the source folder, hence
    # the chdir) is resolved in the container's working directory, /app, where the checkout is
    # mounted. The image is built from containers/ and present on the worker host or in the
    # cluster's registry: nothing to build or push.
    with _cwd(spec.source):
        target = load_flow_from_entrypoint(spec.entrypoint)
        return str(target.deploy(image=spec.image, build=False, push=False, **common))


def _param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected key=value (value as JSON or a string)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=("local", "production", "kubernetes"), default="local")
    ap.add_argument("--name", help="deployment name (default nightly-retrain)")
    ap.add_argument("--cron", help="cron schedule (default '0 2 * * *')")
    ap.add_argument("--timezone", help="schedule time zone (default UTC)")
    ap.add_argument("--work-pool", dest="work_pool", help="work pool name")
    ap.add_argument("--source", help="folder with the flow's code (default: this checkout)")
    ap.add_argument("--entrypoint", help="path/to/file.py:flow (relative to --source)")
    ap.add_argument("--image", help="production: the image the flow runs in")
    ap.add_argument("--workspace", help="production: host path of the checkout mounted at /app")
    ap.add_argument("--image-tag", dest="image_tag", help="kubernetes: tag of livethinking/{light,train,vllm}")
    ap.add_argument("--image-repo", dest="image_repo", help="kubernetes: the images' registry path (default livethinking)")
    ap.add_argument("--param", action="append", type=_param, default=[], help="flow parameter key=value (repeatable)")
    ap.add_argument("--paused", action="store_true", help="create the schedule paused")
    args = ap.parse_args(argv)
    overrides = {k: getattr(args, k) for k in ("name", "cron", "timezone", "work_pool", "source", "entrypoint",
                                              "image", "workspace", "image_tag", "image_repo")}
    if args.paused:
        overrides["paused"] = True
    spec = spec_for(args.target, **overrides)
    # The default parameters are the pipeline's; another flow (--entrypoint) starts from none.
    base = {} if args.entrypoint else spec.parameters
    spec = dataclasses.replace(spec, parameters={**base, **dict(args.param)})
    deployment_id = deploy(spec)
    print(json.dumps({"deployment_id": deployment_id, "name": spec.name, "work_pool": spec.work_pool,
                      "pools": sorted(spec.pool_templates) or [spec.work_pool],
                      "cron": spec.cron, "timezone": spec.timezone, "parameters": spec.parameters}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
