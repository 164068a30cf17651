"""Run one pipeline stage in its container, through the Docker SDK.

The command is the stage's own `cmd` in dvc.yaml (`python -m steps.<stage> ...`), so a stage
runs the same in a container as under `dvc repro`. The image is chosen by stage family
(light / train / vllm, built from containers/); the workspace (the checkout with dvc.yaml,
data/ and reports/) is mounted at /app, which is the images' working directory, so paths in
the command mean the same inside and out. Network mode host: MLflow, S3 and model servers
bound to 127.0.0.1 on the host are reachable at the same URLs. Stages run as the calling
user, so their outputs in the workspace belong to whoever runs the pipeline.

A training stage whose params set `launcher` (steps/core/launch.py) starts `accelerate launch`
itself inside its container, on the GPUs the container was given (`gpus`: "all" or ids, for the
families in `gpu_families`); the shared-memory size (`shm_size`) is what NCCL and data loaders need
between its processes. One container holds all of a stage's processes (one machine).

DVC does not see a container run: after one, `dvc commit -f <stage>` records its outputs in
dvc.lock (the flow's job when it uses this runner).

    from flows.docker_runner import DockerRunnerConfig, run_stage_container
    run_stage_container("judge", DockerRunnerConfig(workspace="/srv/lt"), log=logger.info)
"""
from __future__ import annotations

import contextlib
import os
import shlex
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


# Stages not named here run in the train image, which holds everything steps/ needs but vLLM:
# a new method's training stage runs there without an edit here.
FAMILIES = {"light": ("ingest", "judge", "evaluate", "report", "export", "promote"),
            "train": ("pretrain_demo", "rft", "grpo"),
            "vllm": ("sample",)}
DEFAULT_FAMILY = "train"
DEFAULT_IMAGES = {"light": "livethinking/light:latest", "train": "livethinking/train:latest",
                  "vllm": "livethinking/vllm:latest"}
# Passed from the caller's environment into every stage container: tracking, storage, the
# pipeline's own switches, model hubs and backends, and the distributed launcher's settings
# (ACCELERATE_*, NCCL_*: e.g. NCCL_DEBUG, NCCL_SOCKET_IFNAME). Nothing else leaks in (no PATH, no HOME).
ENV_PREFIXES = ("MLFLOW_", "AWS_", "S3_", "PIPELINE_", "HF_", "VLLM_", "OPENAI_", "TOKENIZERS_", "CUDA_VISIBLE_",
                "ACCELERATE_", "NCCL_")
MOUNT_POINT = "/app"


class StageContainerFailed(RuntimeError):
    """A stage exited non-zero in its container; carries its last log lines."""

    def __init__(self, stage: str, image: str, exit_code: int, tail: list[str]):
        self.stage, self.image, self.exit_code, self.tail = stage, image, exit_code, tail
        super().__init__(f"stage {stage} failed in container {image} (exit {exit_code}); last lines:\n"
                         + "\n".join(tail))


@dataclass(frozen=True)
class DockerRunnerConfig:
    workspace: str = "."  # host path of the checkout (inside a container: the host's path, not ours)
    images: dict = field(default_factory=lambda: dict(DEFAULT_IMAGES))
    gpus: str | None = None  # None: no GPU; "all"; or device ids "0,1"
    gpu_families: tuple[str, ...] = ("train", "vllm")  # light stages get no GPU unless listed here
    network_mode: str = "host"
    user: str | None = "host"  # "host": the calling uid:gid; None: the image's own (non-root) user
    shm_size: str | None = "8g"  # torch data loaders and NCCL need more than Docker's 64 MB default
    env: dict = field(default_factory=dict)  # extra variables, set after the passed-through ones
    dvc_yaml: str = "dvc.yaml"  # relative to workspace
    tail_lines: int = 40
    remove: bool = True

    def __post_init__(self) -> None:
        missing = sorted(set(FAMILIES) - set(self.images))
        if missing:
            raise ValueError(f"images: no image for stage families {missing}")
        unknown = sorted(set(self.gpu_families) - set(FAMILIES))
        if unknown:
            raise ValueError(f"gpu_families: unknown families {unknown}; known: {sorted(FAMILIES)}")


def family_of(stage: str) -> str:
    """The image family of a stage (`evaluate@rft` is an `evaluate` stage)."""
    base = stage.split("@", 1)[0]
    return next((family for family, stages in FAMILIES.items() if base in stages), DEFAULT_FAMILY)


def image_for(stage: str, images: dict[str, str]) -> str:
    return images[family_of(stage)]


def stage_command(stage: str, dvc_yaml: str | Path) -> list[str]:
    """The stage's dvc.yaml cmd as the container command: the words after `python -m`
    (the images' ENTRYPOINT is ["python", "-m"])."""
    cmd = resolved_stages(Path(dvc_yaml)).get(stage, KeyError)
    if cmd is KeyError:
        raise ValueError(f"{dvc_yaml}: no stage {stage!r}; have {list(resolved_stages(Path(dvc_yaml)))}")
    if isinstance(cmd, list):
        if len(cmd) != 1:
            raise ValueError(f"{dvc_yaml}: stages.{stage}.cmd: a container runs one command, got {len(cmd)}")
        cmd = cmd[0]
    words = shlex.split(str(cmd or ""))
    module = f"steps.{stage.split('@', 1)[0]}"
    if words[:3] != ["python", "-m", module]:
        raise ValueError(f"{dvc_yaml}: stages.{stage}.cmd must start with `python -m {module}`, got {cmd!r}")
    return words[2:]


def resolved_stages(dvc_yaml: Path) -> dict[str, Any]:
    """Stage name -> cmd, as DVC resolves them: `foreach` stages expanded (evaluate@teacher, ...)
    and `${...}` filled from params.yaml beside dvc.yaml."""
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    repo = Repo(str(dvc_yaml.parent), uninitialized=True)
    try:
        stages = repo.index.stages
        return {s.name: s.cmd for s in stages if isinstance(s, PipelineStage)
                and Path(s.path).resolve() == dvc_yaml.resolve()}
    finally:
        repo.close()


def container_env(environ: dict[str, str], extra: dict[str, str] | None = None,
                  prefixes: Iterable[str] = ENV_PREFIXES) -> dict[str, str]:
    prefixes = tuple(prefixes)
    env = {k: v for k, v in environ.items() if k.startswith(prefixes)}
    # HOME: a host uid has no home in the image; libraries (HF, MLflow) want a writable one.
    env.update({"PYTHONUNBUFFERED": "1", "HOME": "/tmp"})
    env.update({k: str(v) for k, v in (extra or {}).items()})
    return env


def gpu_request(gpus: str | None) -> dict[str, Any] | None:
    """Keyword arguments of docker.types.DeviceRequest for `gpus` ("all", "0,1" or None)."""
    if not gpus:
        return None
    if gpus == "all":
        return {"count": -1, "capabilities": [["gpu"]]}
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    return {"device_ids": ids, "capabilities": [["gpu"]]}


def run_kwargs(stage: str, cfg: DockerRunnerConfig, environ: dict[str, str],
               uid_gid: str | None = None) -> dict[str, Any]:
    """Everything `client.containers.run` gets, as plain data (device requests as dicts)."""
    workspace = Path(cfg.workspace).resolve()
    family = family_of(stage)
    gpu = gpu_request(cfg.gpus) if family in cfg.gpu_families else None
    user = (uid_gid or f"{os.getuid()}:{os.getgid()}") if cfg.user == "host" else cfg.user
    kw: dict[str, Any] = {
        "image": cfg.images[family], "command": stage_command(stage, workspace / cfg.dvc_yaml),
        "environment": container_env(environ, cfg.env), "working_dir": MOUNT_POINT,
        "volumes": {str(workspace): {"bind": MOUNT_POINT, "mode": "rw"}}, "network_mode": cfg.network_mode,
        "labels": {"livethinking.stage": stage, "livethinking.family": family},
        "device_requests": [gpu] if gpu else [],
    }
    if user:
        kw["user"] = user
    if cfg.shm_size:
        kw["shm_size"] = cfg.shm_size
    return kw


class LineSplitter:
    """Byte chunks from a log stream -> complete text lines. tqdm redraws a line with carriage
    returns; only its last state is kept, so a progress bar is one line, not hundreds."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r").split("\r")[-1]
            if line.strip():
                yield line

    def flush(self) -> Iterator[str]:
        rest, self._buf = self._buf, b""
        if rest:
            yield from self.feed(rest + b"\n")


def run_stage_container(stage: str, cfg: DockerRunnerConfig = DockerRunnerConfig(),
                        log: Callable[[str], Any] = print, client: Any = None,
                        environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `stage` in its image and stream its log, line by line, to `log` (e.g. a Prefect
    task logger's `info`). Returns {stage, image, exit_code, seconds}; raises
    StageContainerFailed (with the last `cfg.tail_lines` lines) when the stage fails."""
    import docker
    from docker.types import DeviceRequest

    client = client or docker.from_env()
    kw = run_kwargs(stage, cfg, dict(os.environ if environ is None else environ))
    kw["device_requests"] = [DeviceRequest(**d) for d in kw["device_requests"]]
    t0 = time.monotonic()
    try:
        container = client.containers.run(detach=True, **kw)
    except docker.errors.ImageNotFound:
        family = family_of(stage)
        raise RuntimeError(f"stage {stage}: image {kw['image']} not found; build it with "
                           f"docker build -f containers/Dockerfile.{family} -t {kw['image']} .") from None
    tail: deque[str] = deque(maxlen=cfg.tail_lines)
    lines = LineSplitter()
    try:
        for chunk in container.logs(stream=True, follow=True):
            for line in lines.feed(chunk):
                tail.append(line)
                log(f"{stage} | {line}")
        for line in lines.flush():
            tail.append(line)
            log(f"{stage} | {line}")
        exit_code = int(container.wait().get("StatusCode", -1))
    except BaseException:
        # Interrupted (Prefect cancellation, Ctrl-C): do not leave the stage running.
        with contextlib.suppress(docker.errors.APIError):
            container.kill()
        raise
    finally:
        if cfg.remove:
            container.remove(force=True)
    if exit_code != 0:
        raise StageContainerFailed(stage, kw["image"], exit_code, list(tail))
    return {"stage": stage, "image": kw["image"], "exit_code": exit_code, "seconds": round(time.monotonic() - t0, 1)}
