"""Typed, frozen stage configs built from one section of params.yaml.

Every stage has a frozen dataclass whose fields carry help text in `metadata["help"]`.
`load_config` builds it from the stage's section, refusing unknown keys by name and file,
and injecting the shared `base` keys (seed, ...) that the dataclass declares.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

PARAMS_FILE = Path(os.environ.get("PIPELINE_PARAMS", "params.yaml"))

T = TypeVar("T")


class ConfigError(ValueError):
    """A params.yaml problem a person can fix: the message names the file, section and key."""


def help_field(default: Any = dataclasses.MISSING, help: str = "", **kw: Any) -> Any:  # noqa: A002
    """A dataclass field with help text (shown by `python -m steps.<stage> --help-config`)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn YAML lists into tuples (frozen configs must be hashable) and check simple types."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if value is None:
        if annotation is type(None) or (args and type(None) in args) or annotation is Any:
            return None
        raise ConfigError(f"{where}: must not be null")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        non_none = [a for a in args if a is not type(None)]
        if len(non_none) == 1:
            return _coerce(value, non_none[0], where)
        return value
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}")
    if origin is dict and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def build(cls: type[T], section: dict[str, Any], where: str) -> T:
    """Build the frozen dataclass `cls` from a mapping; `where` names file and section in errors."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in section.items()}
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{where}: {e}") from e


def load_config(cls: type[T], stage: str, path: Path | str = PARAMS_FILE,
                params: dict[str, Any] | None = None) -> T:
    """Build `cls` from section `stage`; declared fields named in `base` are filled from there
    unless the stage section sets them itself (null counts as unset, so `rft: {seed: null}`
    documents the key in params.yaml and still follows `base.seed`)."""
    params = load_params(path) if params is None else params
    if stage not in params:
        raise ConfigError(f"{path}: missing section '{stage}'")
    section = dict(params[stage] or {})
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for k, v in (params.get("base") or {}).items():
        if k in names and section.get(k) is None:
            section[k] = v
    return build(cls, section, f"{path}: section '{stage}'")


def config_hash(*objs: Any) -> str:
    """A short stable hash of configs and other JSON-able values (used for resume keys)."""
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)  # type: ignore[arg-type]
        return str(o)
    blob = json.dumps(objs, sort_keys=True, default=default).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def describe(cls: type) -> str:
    """Help text for a config class, one line per field."""
    lines = [f"{cls.__name__}:"]
    for f in dataclasses.fields(cls):
        default = "" if f.default is dataclasses.MISSING else f" (default {f.default!r})"
        lines.append(f"  {f.name}{default}: {f.metadata.get('help', '')}")
    return "\n".join(lines)
