"""Scale-out training: a training stage runs itself again under `accelerate launch` when its
params ask for it.

A training stage's section takes `launcher` (default: empty, one plain process, as before):

    rft:
      launcher: {config: infra/accelerate/ddp.yaml, num_processes: 2}

`config` is an accelerate config file (infra/accelerate/: ddp, fsdp, zero2, zero3) and
`num_processes` the number of processes (one per GPU). DVC's command stays
`python -m steps.<stage> ...`: the stage loads its params, and when a launcher is set it starts
`python -m accelerate.commands.launch --config_file ... --num_processes N -m steps.<stage> <its own
arguments>` and exits with its status (the sample stage re-executes itself under another
interpreter the same way). The children know they were launched (`PIPELINE_LAUNCHED`) and train.

Outputs are written once: in a launched run only the main process (RANK 0) writes files
(steps.core.io's writers are no-ops elsewhere), logs to MLflow (steps.core.tracking) and saves
the model (the trainer's own rule); every process trains, and all wait for the saved model
before any reads it back.

Batch sizes in params are global (the sequences of one optimiser step): the trainers split them
over the processes, so a launcher changes how a step is computed, not what it computes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps.core.config import ConfigError, build, help_field

# Set in the environment of the launched processes: they train, they never launch again.
LAUNCHED_ENV = "PIPELINE_LAUNCHED"
CONFIG_DIR = Path("infra/accelerate")


@dataclass(frozen=True)
class Launcher:
    config: str | None = help_field(None, "accelerate config file, e.g. infra/accelerate/ddp.yaml (fsdp.yaml, "
                                          "zero2.yaml, zero3.yaml); null: one plain process, no launcher")
    num_processes: int = help_field(1, "processes, one per GPU (ddp.yaml and fsdp.yaml need 2 or more)", ge=1)
    main_process_port: int | None = help_field(None, "rendezvous port (null: accelerate's 29500, or a free "
                                                     "one when that is taken)", ge=0, le=65535)


def parse(spec: dict[str, Any] | None, where: str = "launcher") -> Launcher:
    """The `launcher` mapping of a stage's section as a Launcher; errors name `where.<key>`."""
    launcher = build(Launcher, dict(spec or {}), where)
    if launcher.config is None and launcher.num_processes > 1:
        raise ConfigError(f"{where}.num_processes: {launcher.num_processes} processes need {where}.config, an "
                          f"accelerate config file (e.g. {CONFIG_DIR / 'ddp.yaml'})")
    return launcher


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Rank 0 of a launched run (torchrun, which accelerate launch runs, sets RANK), or a plain process."""
    from steps.core.io import is_main_process

    return is_main_process()


def per_device_batch(global_batch: int, what: str) -> int:
    """A global batch split over the processes; `what` names the params key(s) in the error."""
    n = world_size()
    if global_batch % n:
        raise ConfigError(f"{what} = {global_batch} sequences per optimiser step do not split over {n} processes "
                          f"(launcher.num_processes): make it a multiple of {n}")
    return global_batch // n


def command(module: str, launcher: Launcher, argv: list[str]) -> list[str]:
    """`accelerate launch` running `python -m module argv` under `launcher`."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher.config),
           "--num_processes", str(launcher.num_processes)]
    if launcher.main_process_port is not None:
        cmd += ["--main_process_port", str(launcher.main_process_port)]
    return [*cmd, "-m", module, *argv]


def relaunched(module: str, spec: dict[str, Any] | None, argv: list[str] | None, params: str | Path,
               section: str) -> bool:
    """Run this stage again under `accelerate launch` when its `launcher` asks for it (module
    docstring). True when it ran there (the caller returns: the launched processes wrote the
    outputs); False when this process is the one to train in. A failed run exits with its status."""
    where = f"{params}: section '{section}': launcher"
    launcher = parse(spec, where)
    if launcher.config is None:
        return False
    if os.environ.get(LAUNCHED_ENV):
        _use_local_gpu()
        return False
    if not Path(launcher.config).is_file():
        known = sorted(str(p) for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
        raise ConfigError(f"{where}.config: {launcher.config!r} is not a file (relative to the repository root); "
                          f"the repository's configs: {known}")
    check_config(launcher.config, f"{where}.config")
    argv = sys.argv[1:] if argv is None else list(argv)
    code = subprocess.run(command(module, launcher, argv), env={**os.environ, LAUNCHED_ENV: "1"}).returncode
    if code:
        raise SystemExit(code)
    return True


def _use_local_gpu() -> None:
    """In a launched process, make "cuda" mean this process's GPU from the start: what a stage
    decodes before its trainer exists (GRPO's L_ref samples, AdaptThink's reference pass) would
    otherwise put every process's model on GPU 0. accelerate sets the same device later."""
    import torch

    if torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def distributed_type(config: str | Path) -> str:
    """The `distributed_type` of an accelerate config file, read by accelerate itself (so a file
    accelerate would refuse is refused here): MULTI_GPU, FSDP, DEEPSPEED, ..."""
    from accelerate.commands.config.config_args import load_config_from_file

    return str(load_config_from_file(str(config)).distributed_type).split(".")[-1]


def check_config(config: str | Path, where: str) -> str:
    """Refuse a launcher config that would not do what it says on this machine; returns its
    distributed type. accelerate runs FSDP on accelerators only: without CUDA the trainers use the
    CPU, and accelerate would quietly train as plain data parallel instead. DeepSpeed runs on CPU
    processes too (its CPU accelerator, gloo), so it needs only to be installed."""
    import importlib.util

    import torch

    kind = distributed_type(config)
    if kind == "FSDP" and not torch.cuda.is_available():
        raise ConfigError(f"{where}: {config} asks for FSDP, which accelerate runs on GPUs only, and this machine "
                          f"has no CUDA device (it would train as plain DDP): use {CONFIG_DIR / 'ddp.yaml'} or "
                          f"{CONFIG_DIR / 'zero3.yaml'} here")
    if kind == "DEEPSPEED" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"{where}: {config} needs DeepSpeed: pip install deepspeed (requirements.txt pins it)")
    return kind


def wait_for_everyone() -> None:
    """A barrier across the launched processes (nothing without a launcher). Before the trainer
    exists this initialises accelerate's shared state, with the trainers' own device rule
    (steps.core.training.common_args: CPU when there is no CUDA) so that they find it as they
    would have made it."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available()).wait_for_everyone()
