"""MLflow tracking: the only module that imports mlflow.

Each stage process logs one run. When the Prefect flow (or any caller) exports
MLFLOW_PARENT_RUN_ID, the stage's run is nested under that pipeline run; otherwise it stands
alone. PIPELINE_EXPERIMENT (set by flows/ablations.py) tags it with the DVC experiment it
belongs to. The tracking store defaults to a local SQLite file (`sqlite:///mlflow.db`);
MLFLOW_TRACKING_URI overrides it (an MLflow server, with artefacts on S3). Set
PIPELINE_TRACKING=off to skip tracking entirely (unit tests of stage cores).

Tracking is a side channel: its failure never fails a stage whose outputs are written.
`log_stage` and `pipeline_run` catch any error from the store, say so in one warning line (the
tracking URI and the error), and append what they would have logged to a local file,
`.cache/tracking/pending.jsonl` (PIPELINE_TRACKING_PENDING overrides; outside DVC's outputs), which
`python -m steps.core.tracking replay [--uri URI]` sends once the store is back. Against a
server, MLflow's own HTTP retries come first (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, with
exponential back-off; MLFLOW_HTTP_REQUEST_TIMEOUT per request).

Params are redacted before they are logged (steps.core.secrets): a secret-named key's value and
anything shaped like a key or token become `***redacted***`, in stage runs and the pipeline run.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from steps.core import secrets
from steps.core.lineage import git_commit

log = logging.getLogger(__name__)

DEFAULT_URI = "sqlite:///mlflow.db"
EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT_NAME", "livethinking")


def enabled() -> bool:
    """Tracking is on unless PIPELINE_TRACKING turns it off; in a stage launched on several
    processes (steps.core.launch) only the main one logs."""
    from steps.core.io import is_main_process

    return os.environ.get("PIPELINE_TRACKING", "on").lower() not in ("off", "0", "false") and is_main_process()


def _mlflow(uri: str | None = None, experiment: str | None = None):
    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(uri or tracking_uri())
    mlflow.set_experiment(experiment or EXPERIMENT)
    return mlflow


def _flatten(prefix: str, obj: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Nested params as flat `a.b.c` keys, secrets redacted (module docstring)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)  # type: ignore[arg-type]
    if not prefix:
        obj = secrets.redact(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = str(obj)[:500]
    return out


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)


def pending_path() -> Path:
    return Path(os.environ.get("PIPELINE_TRACKING_PENDING", ".cache/tracking/pending.jsonl"))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock beside the pending file: stages append while a replay rewrites it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _outage(what: str, error: BaseException, record: dict[str, Any]) -> None:
    """One loud line, and the record kept for `replay`. Never raises: if even the local file
    cannot be written, the warning says so and the stage still succeeds."""
    path = pending_path()
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    record = {**record, "uri": tracking_uri(), "experiment": EXPERIMENT, "error": reason,
              "failed_unix": int(time.time()), "cwd": os.getcwd()}
    try:
        line = json.dumps(record, default=str) + "\n"
        with _locked(path):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line.encode())  # one write: a kill leaves a whole line or a torn last one
            finally:
                os.close(fd)
        kept = f"kept in {path}; send it later with `python -m steps.core.tracking replay`"
    except OSError as e:
        kept = f"and it could not be kept either ({path}: {e})"
    log.warning("tracking unavailable (%s): %s was not logged (%s); %s", tracking_uri(), what, reason, kept)


def _stage_tags(stage: str) -> dict[str, str]:
    tags = {"stage": stage, "git_commit": git_commit()}
    if os.environ.get("MLFLOW_PARENT_RUN_ID"):
        tags["mlflow.parentRunId"] = os.environ["MLFLOW_PARENT_RUN_ID"]
    if os.environ.get("PIPELINE_EXPERIMENT"):
        tags["experiment"] = os.environ["PIPELINE_EXPERIMENT"]
    return tags


@contextlib.contextmanager
def stage_run(stage: str, cfg: Any = None) -> Iterator[Any]:
    """A run for one stage (nested under MLFLOW_PARENT_RUN_ID when set). Yields the mlflow
    module, or None when tracking is off, so callers write `if run: run.log_metric(...)`."""
    if not enabled():
        yield None
        return
    mlflow = _mlflow()
    with mlflow.start_run(run_name=stage, tags=_stage_tags(stage)):
        if cfg is not None:
            mlflow.log_params(_flatten("", cfg, {}))
        yield mlflow


def log_stage(stage: str, cfg: Any, metrics: dict[str, float] | None = None,
              artifacts: list[Path | str] = (), history: list[dict[str, Any]] | None = None) -> bool:
    """Log a finished stage: config as params, final metrics, step-wise history, artefacts.
    Returns whether it was logged; a tracking failure is survived (module docstring)."""
    if not enabled():
        return False
    metrics = {k: float(v) for k, v in (metrics or {}).items() if v is not None}
    steps = [(int(row.get("step", 0)), {k: float(v) for k, v in row.items()
                                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)})
             for row in history or []]
    params = _flatten("", cfg, {}) if cfg is not None else {}
    try:
        _send_stage(stage, _stage_tags(stage), params, metrics, steps, [str(a) for a in artifacts])
        return True
    except Exception as e:  # noqa: BLE001 - any store error (HTTP, SQL, S3): the outputs are written
        _outage(f"stage {stage}", e, {"kind": "stage", "stage": stage, "tags": _stage_tags(stage), "params": params,
                                      "metrics": metrics, "history": steps,
                                      "artifacts": [str(Path(a).resolve()) for a in artifacts]})
        return False


def _send_stage(stage: str, tags: dict[str, str], params: dict[str, str], metrics: dict[str, float],
                steps: list[tuple[int, dict[str, float]]], artifacts: list[str], uri: str | None = None,
                experiment: str | None = None) -> None:
    mlflow = _mlflow(uri, experiment)
    with mlflow.start_run(run_name=stage, tags=tags):
        if params:
            mlflow.log_params(params)
        if metrics:
            mlflow.log_metrics(metrics)
        for step, values in steps:
            mlflow.log_metrics(values, step=step)
        for a in map(Path, artifacts):
            if a.is_dir():
                mlflow.log_artifacts(str(a), artifact_path=a.name)
            elif a.exists():
                mlflow.log_artifact(str(a))


@contextlib.contextmanager
def pipeline_run(name: str, params: dict[str, Any]) -> Iterator[str | None]:
    """The parent run of one pipeline run; yields its id (None when tracking is off, or when
    the store cannot be reached: then the stages log on their own, or keep their records)."""
    if not enabled():
        yield None
        return
    tags = {"git_commit": git_commit(), "kind": "pipeline"}
    flat = _flatten("", params, {})
    try:
        mlflow = _mlflow()
        run = mlflow.start_run(run_name=name, tags=tags)
        try:
            mlflow.log_params(flat)
        except Exception:
            mlflow.end_run("FAILED")
            raise
    except Exception as e:  # noqa: BLE001 - the pipeline runs without its parent run
        _outage(f"pipeline run {name!r}", e, {"kind": "pipeline", "name": name, "tags": tags, "params": flat})
        yield None
        return
    status = "FAILED"
    try:
        yield run.info.run_id
        status = "FINISHED"
    finally:
        try:
            mlflow.end_run(status)
        except Exception as e:  # noqa: BLE001 - closing the run is bookkeeping, the stages are done
            log.warning("tracking unavailable (%s): could not close pipeline run %s (%s)", tracking_uri(),
                        run.info.run_id, " ".join(str(e).split())[:300])


MLMODEL = "MLmodel"
CHECKSUMS_TAG = "checksums_sha256"  # model-version tag: sha256 of the MLmodel's checksum table


def register_bundle(stage_cfg: Any, bundle: Path, model_name: str, metrics: dict[str, float],
                    tags: dict[str, str], example: dict[str, Any] | None = None,
                    max_new_tokens: int = 256, pip_requirements: list[str] | None = None) -> dict[str, Any]:
    """Log a model bundle (a transformers model directory with its tokenizer and chat template)
    as an MLflow model with the transformers flavour, task text-generation, and register it as a
    new version of `model_name`. Returns {run_id, version, source, model_id}.

    The MLflow model is what `mlflow.transformers.load_model`, `mlflow.pyfunc.load_model` and
    `mlflow models serve` load from `models:/<name>@<alias>`. `example` ({messages, prompt}: the
    chat turns and the prompt the chat template renders from them) becomes the input example;
    the signature takes a rendered prompt and generation params (max_new_tokens, do_sample,
    temperature). The MLmodel's metadata holds the sha256 of every other file of the model
    (`checksums`), the bundle's own checksums.json, its meta.json (lineage) and the metrics; the
    version's tag `checksums_sha256` pins that table from the registry's side, so a serving
    client can tell a changed artefact store (or MLmodel) from what was registered.
    `pip_requirements` defaults to serving_requirements() (this environment's mlflow,
    transformers, torch, tokenizers and safetensors, pinned)."""
    if not enabled():
        return {"run_id": None, "version": None, "source": None, "model_id": None}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = Path(bundle)
    metadata = {"metrics": {k: float(v) for k, v in metrics.items() if v is not None}}
    for key, name in (("lineage", "meta.json"), ("bundle_checksums", "checksums.json")):
        if (bundle / name).exists():
            metadata[key] = json.loads((bundle / name).read_text())
    if example:
        metadata["example_messages"] = list(example["messages"])
    with stage_run("export", stage_cfg) as mlflow:
        from mlflow.models import Model, infer_signature

        mlflow.log_metrics(metadata["metrics"])
        params = {"max_new_tokens": int(max_new_tokens), "do_sample": False, "temperature": 1.0}
        prompt = example["prompt"] if example else "<user> hello <assistant> "
        components = {"model": AutoModelForCausalLM.from_pretrained(bundle),
                      "tokenizer": AutoTokenizer.from_pretrained(bundle)}
        # Model.log with a flavour of our own (mlflow.transformers.log_model does the same with
        # the module), so that the checksums are taken of the very files MLflow wrote, before
        # they are uploaded. (A bundle path as `transformers_model` would copy the files as
        # they are, but MLflow 3.17 fails on it under transformers 5.)
        info = Model.log(None, name="model", flavor=_ChecksummedTransformers, flavor_name="transformers",
                         transformers_model=components, task="text-generation",
                         signature=infer_signature(prompt, ["<think> ... </think> ..."], params=params),
                         input_example=(prompt, {"max_new_tokens": 8}) if example else None,
                         # The pipeline returns only the completion, as a chat endpoint does.
                         model_config={"return_full_text": False}, metadata=metadata,
                         # Given, not inferred: MLflow's inference loads the model and asks
                         # for packages (torchvision) a text model does not need.
                         pip_requirements=pip_requirements or serving_requirements(),
                         registered_model_name=model_name,
                         tags={k: str(v) for k, v in tags.items()})
        version = str(info.registered_model_version)
        client = mlflow.MlflowClient()
        client.set_model_version_tag(model_name, version, CHECKSUMS_TAG,
                                     checksum_table_digest(info.metadata["checksums"]))
        mv = client.get_model_version(model_name, version)
        return {"run_id": mlflow.active_run().info.run_id, "version": int(version), "source": mv.source,
                "model_id": info.model_id}


class _ChecksummedTransformers:
    """mlflow.transformers' save_model, then the sha256 of every file it wrote into MLmodel's
    metadata (MLmodel itself cannot list its own digest)."""
    __name__ = "mlflow.transformers"

    @staticmethod
    def save_model(path: str, mlflow_model: Any, **kwargs: Any) -> None:
        import mlflow

        mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model, **kwargs)
        root = Path(path)
        mlflow_model.metadata = {**(mlflow_model.metadata or {}), "checksums": {
            p.relative_to(root).as_posix(): _sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MLMODEL}}
        mlflow_model.save(str(root / MLMODEL))


# What `mlflow models serve` / mlflow.pyfunc need to run the registered model, pinned to the
# versions that made it (a local build label such as torch's "+cpu" dropped: GPU machines
# install the same version's CUDA build).
SERVING_PACKAGES = ("mlflow", "transformers", "torch", "tokenizers", "safetensors")


def serving_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in SERVING_PACKAGES]


def _sha256_file(path: Path) -> str:
    # Not steps.core.storage's: every stage imports this module, and DVC would re-run them all
    # when storage changed.
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checksum_table_digest(checksums: dict[str, str]) -> str:
    """One sha256 over a {file: sha256} table (canonical JSON), small enough for a tag."""
    return hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def download_model(model_name: str, alias: str | None = None, version: int | None = None,
                   dst: Path | None = None) -> dict[str, Any]:
    """Download a registered version (by alias, or by number) into `dst` (a fresh folder is
    made when None) and return {version, path, metadata (MLmodel's), tags (the version's)}.
    Nothing is verified here: steps.core.serving.verify_registered checks the files."""
    mlflow, client = _client()
    try:
        mv = (client.get_model_version_by_alias(model_name, alias) if version is None
              else client.get_model_version(model_name, str(version)))
    except mlflow.exceptions.MlflowException as e:
        what = f"alias {alias!r}" if version is None else f"version {version}"
        raise LookupError(f"model registry {os.environ.get('MLFLOW_TRACKING_URI', DEFAULT_URI)}: "
                          f"{model_name!r} has no {what} ({e.message}); run the pipeline "
                          "(export, then promote) or pick another with --alias/--version") from None
    if dst is not None:
        Path(dst).mkdir(parents=True, exist_ok=True)
    # By number, not alias: the alias may move while the files come down.
    path = Path(mlflow.artifacts.download_artifacts(f"models:/{model_name}/{mv.version}",
                                                    dst_path=None if dst is None else str(dst)))
    from mlflow.models import Model

    return {"version": int(mv.version), "path": path, "metadata": Model.load(str(path)).metadata or {},
            "tags": dict(mv.tags or {})}


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


# --- replay ----------------------------------------------------------------------------------

def replay(uri: str | None = None, path: Path | None = None) -> tuple[int, int]:
    """Send every record in the pending file (oldest first) to `uri` (default: the URI each
    record failed on); records sent are removed, the rest stay. Returns (sent, left)."""
    path = path or pending_path()
    if not path.exists():
        return 0, 0
    sent, left = 0, []
    with _locked(path):
        lines = path.read_text().splitlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s: line %d is torn (a kill while it was written); dropped", path, n)
                continue
            try:
                _replay_one(rec, uri)
                sent += 1
            except Exception as e:  # noqa: BLE001 - still unavailable: keep it for the next replay
                log.warning("replay: %s: still not logged (%s)", rec.get("stage") or rec.get("name"),
                            " ".join(str(e).split())[:300])
                left.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in left))
        os.replace(tmp, path)
    return sent, len(left)


def _replay_one(rec: dict[str, Any], uri: str | None) -> None:
    uri, experiment = uri or rec["uri"], rec.get("experiment")
    tags = {**rec.get("tags", {}), "replayed": "true", "failed_unix": str(rec.get("failed_unix", ""))}
    if rec["kind"] == "stage":
        _send_stage(rec["stage"], tags, rec.get("params", {}), rec.get("metrics", {}),
                    [(int(s), m) for s, m in rec.get("history", [])], rec.get("artifacts", []), uri, experiment)
    else:
        mlflow = _mlflow(uri, experiment)
        with mlflow.start_run(run_name=rec["name"], tags=tags):
            mlflow.log_params(rec.get("params", {}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Tracking records kept during an outage.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rp = sub.add_parser("replay", help="send the records kept in the pending file")
    rp.add_argument("--uri", default=None, help="tracking URI (default: the one each record failed on)")
    rp.add_argument("--file", default=None, help=f"pending file (default {pending_path()})")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    sent, left = replay(args.uri, Path(args.file) if args.file else None)
    print(f"tracking replay: {sent} record(s) sent, {left} left")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
