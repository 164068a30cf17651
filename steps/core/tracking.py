"""MLflow tracking: the only module that imports mlflow.

Each stage process logs one run. When the Prefect flow (or any caller) exports
MLFLOW_PARENT_RUN_ID, the stage's run is nested under that pipeline run; otherwise it stands
alone. PIPELINE_EXPERIMENT (set by flows/ablations.py) tags it with the DVC experiment it
belongs to. The tracking store defaults to a local SQLite file (`sqlite:///mlflow.db`);
MLFLOW_TRACKING_URI overrides it (an MLflow server, with artefacts on S3). Set
PIPELINE_TRACKING=off to skip tracking entirely (unit tests of stage cores).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steps.core.lineage import git_commit

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "livethinking")


def enabled() -> bool:
    return os.environ.get("PIPELINE_TRACKING", "on").lower() not in ("off", "0", "false")


def _mlflow():
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI))
    mlflow.set_experiment(EXPERIMENT)
    return mlflow


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)  # type: ignore[arg-type]
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


@contextlib.contextmanager
def stage_run(stage: str, cfg: Any = None) -> Iterator[Any]:
    """A run for one stage (nested under MLFLOW_PARENT_RUN_ID when set). Yields the mlflow
    module, or None when tracking is off, so callers write `if run: run.log_metric(...)`."""
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    parent = os.environ.get("MLFLOW_PARENT_RUN_ID")
    tags = {"stage": stage, "git_commit": git_commit()}
    if parent:
        tags["mlflow.parentRunId"] = parent
    if os.environ.get("PIPELINE_EXPERIMENT"):
        tags["experiment"] = os.environ["PIPELINE_EXPERIMENT"]
    with mlflow.start_run(run_name=stage, tags=tags):
        if cfg is not None:
            mlflow.log_params(_flatten("", cfg, {}))
        yield mlflow


def log_stage(stage: str, cfg: Any, metrics: dict[str, float] | None = None,
              artifacts: list[Path | str] = (), history: list[dict[str, Any]] | None = None) -> None:
    """Log a finished stage: config as params, final metrics, step-wise history, artefacts."""
    with stage_run(stage, cfg) as mlflow:
        if mlflow is None:
            return
        if metrics:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        for row in history or []:
            step = int(row.get("step", 0))
            mlflow.log_metrics({k: float(v) for k, v in row.items()
                                if k != "step" and isinstance(v, (int, float))}, step=step)
        for a in artifacts:
            a = Path(a)
            if a.is_dir():
                mlflow.log_artifacts(str(a), artifact_path=a.name)
            elif a.exists():
                mlflow.log_artifact(str(a))


@contextlib.contextmanager
def pipeline_run(name: str, params: dict[str, Any]) -> Iterator[str | None]:
    """The parent run of one pipeline run; yields its id (None when tracking is off)."""
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    with mlflow.start_run(run_name=name, tags={"git_commit": git_commit(), "kind": "pipeline"}) as run:
        mlflow.log_params(_flatten("", params, {}))
        yield run.info.run_id


def register_bundle(stage_cfg: Any, bundle: Path, model_name: str, metrics: dict[str, float],
                    tags: dict[str, str]) -> dict[str, Any]:
    """Log a model bundle as the export run's artefacts and register it as a new version of
    `model_name` in the model registry. Returns {run_id, version, source}."""
    if not enabled():
        return {"run_id": None, "version": None, "source": None}
    with stage_run("export", stage_cfg) as mlflow:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None})
        mlflow.log_artifacts(str(bundle), artifact_path="model")
        run = mlflow.active_run()
        source = f"{run.info.artifact_uri}/model"
        client = mlflow.MlflowClient()
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.create_registered_model(model_name)
        mv = client.create_model_version(model_name, source=source, run_id=run.info.run_id,
                                         tags={k: str(v) for k, v in tags.items()})
        return {"run_id": run.info.run_id, "version": int(mv.version), "source": source}


# --- Model registry: aliases, version metrics and tags (used by steps.promote) -------------
# These read and write the registry only; they do not start runs. A missing registered model
# or alias is an answer (None), not an error: the first promotion finds no champion.

def _client():
    mlflow = _mlflow()
    return mlflow, mlflow.MlflowClient()


def model_version(model_name: str, version: int) -> dict[str, Any]:
    """One registered version: {version, run_id, source, metrics (its run's final metrics),
    tags, aliases}."""
    mlflow, client = _client()
    try:
        mv = client.get_model_version(model_name, str(version))
    except mlflow.exceptions.MlflowException as e:
        raise LookupError(f"model registry: {model_name!r} has no version {version} ({e.message})") from None
    metrics = dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    return {"version": int(mv.version), "run_id": mv.run_id, "source": mv.source, "metrics": metrics,
            "tags": dict(mv.tags or {}), "aliases": sorted(mv.aliases or [])}


def alias_version(model_name: str, alias: str) -> int | None:
    """The version that holds `alias`, or None (no such alias, or no such registered model)."""
    mlflow, client = _client()
    try:
        aliases = client.get_registered_model(model_name).aliases or {}
    except mlflow.exceptions.MlflowException:
        return None
    return int(aliases[alias]) if alias in aliases else None


def set_aliases(model_name: str, aliases: dict[str, int | None]) -> None:
    """Point each alias at a version; None removes the alias."""
    _, client = _client()
    for alias, version in aliases.items():
        if version is None:
            if alias_version(model_name, alias) is not None:
                client.delete_registered_model_alias(model_name, alias)
        else:
            client.set_registered_model_alias(model_name, alias, str(version))


def tag_model_version(model_name: str, version: int, tags: dict[str, Any]) -> None:
    """Set tags on a registered version (MLflow caps a tag value at 5000 characters)."""
    _, client = _client()
    for k, v in tags.items():
        client.set_model_version_tag(model_name, str(version), k, str(v)[:5000])
