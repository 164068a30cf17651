"""Lineage: a `meta.json` beside every model artefact (git commit, config hash, parent, metrics)."""
from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path
from typing import Any

from steps.core.config import config_hash
from steps.core.io import read_json, write_json


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build_meta(stage: str, cfg: Any, parent: str | None, metrics: dict[str, Any] | None = None,
               **extra: Any) -> dict[str, Any]:
    """Lineage of an artefact made by `stage` from `parent` (whose own meta.json is nested)."""
    return {"stage": stage, "git_commit": git_commit(), "config_hash": config_hash(cfg),
            "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg,
            "parent": parent, "parent_meta": read_meta(parent) if parent else None,
            "created_unix": int(time.time()), "metrics": metrics or {}, **extra}


def write_meta(model_dir: Path | str, stage: str, cfg: Any, parent: str | None,
               metrics: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    meta = build_meta(stage, cfg, parent, metrics, **extra)
    write_json(Path(model_dir) / "meta.json", meta)
    return meta


def read_meta(model_dir: Path | str) -> dict[str, Any] | None:
    path = Path(model_dir) / "meta.json"
    return read_json(path) if path.exists() else None
