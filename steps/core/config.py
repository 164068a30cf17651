"""Typed, frozen stage configs built from one section of params.yaml.

Every stage has a frozen dataclass whose fields carry help text in `metadata["help"]` and, for
numbers, bounds (`help_field(4, "k", ge=1)`). `load_config` builds it from the stage's section,
refusing unknown keys, wrong types and out-of-range numbers by file, section and key.

One rule for seeds: a stage whose config has a `seed` takes `base.seed` unless its own section
sets a non-null `seed`; without either the stage stops with one message naming `base.seed`
(no stage falls back to 0 on its own, so a missing `base` section can never make two stages
disagree about the seed they used).

Nested options (a back end's `backend_options`, a judge's `options`, a reward's settings) are
checked with `check_options` against the signature of the callable they are passed to, so a
typo or a wrong type stops the stage at load time with the full key path named.

Secrets never go into params: `load_params` refuses a literal key, token or password anywhere in
the file (steps.core.secrets says how to pass one). `ConfigError` and `InputError` are errors a
person fixes: a stage that stops on one prints a single line, not a traceback.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys
import typing
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import yaml

from steps.core import secrets
from steps.core.io import InputError

PARAMS_FILE = Path(os.environ.get("PIPELINE_PARAMS", "params.yaml"))

T = TypeVar("T")

_BOUNDS = {"ge": (">=", lambda v, b: v >= b), "gt": (">", lambda v, b: v > b),
           "le": ("<=", lambda v, b: v <= b), "lt": ("<", lambda v, b: v < b)}


class ConfigError(ValueError):
    """A params.yaml problem a person can fix: the message names the file, section and key."""


def help_field(default: Any = dataclasses.MISSING, help: str = "", *,  # noqa: A002
               ge: float | None = None, gt: float | None = None, le: float | None = None,
               lt: float | None = None, **kw: Any) -> Any:
    """A dataclass field with help text (shown by `describe`) and optional numeric bounds,
    which `build` checks (null passes: optional fields say what null means in their help)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a default_factory for mutable defaults")
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return dataclasses.field(default=default, metadata={"help": help, **bounds}, **kw)


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a pasted-in override would hide the value a person thinks is in force)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # `{{}}`: PyYAML's own message, with the place
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        "found unhashable key", key_node.start_mark)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping (first on line {seen[key]})", mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """The params file as a mapping of sections. A YAML error is one ConfigError naming the file,
    line and column; a literal secret anywhere in the file is refused (module docstring)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found (run from the repository root)")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_StrictLoader) or {}  # noqa: S506 - safe loader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: {where}invalid YAML: {problem}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    found = secrets.find_secrets(data)
    if found:
        raise ConfigError(f"{path}: {', '.join(found[:5])}: a literal secret in params is refused; "
                          + secrets.how_to(found[0]))
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
        for alternative in non_none:  # the first that fits (e.g. `base_url: str | list[str]`)
            try:
                return _coerce(value, alternative, where)
            except ConfigError:
                continue
        names = " or ".join(getattr(a, "__name__", None) if typing.get_origin(a) is None else str(a) for a in non_none)
        raise ConfigError(f"{where}: expected {names}, got {type(value).__name__} {value!r}"[:300])
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise ConfigError(f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}"[:300])
        if annotation is float and not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if (origin is dict or annotation is dict) and not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__} {value!r}"[:300])
    if (origin is list or annotation is list) and not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}"[:300])
    if origin is list and args:
        for i, v in enumerate(value):
            _coerce(v, args[0], f"{where}[{i}]")
    return value


def check_bounds(value: Any, metadata: typing.Mapping[str, Any], where: str) -> None:
    """Raise ConfigError if a number breaks the bounds in a field's metadata (ge, gt, le, lt)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for name, (sign, ok) in _BOUNDS.items():
        if name in metadata and not ok(value, metadata[name]):
            raise ConfigError(f"{where}: must be {sign} {metadata[name]}, got {value!r}")


def build(cls: type[T], section: dict[str, Any], where: str) -> T:
    """Build the frozen dataclass `cls` from a mapping; `where` names file and section in errors.
    Errors raised by `__post_init__` (ValueError, TypeError, ConfigError) get `where` in front,
    so checks there name the key relative to the section (e.g. "backend_options.concurrency")."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(section).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(section) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; allowed keys are {sorted(fields)}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in section.items()}
    for k, v in kwargs.items():
        check_bounds(v, fields[k].metadata, f"{where}.{k}")
    missing = [n for n, f in fields.items() if n not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        if str(e).startswith(where):
            raise
        raise ConfigError(f"{where}: {e}") from e


def load_config(cls: type[T], stage: str, path: Path | str = PARAMS_FILE,
                params: dict[str, Any] | None = None) -> T:
    """Build `cls` from section `stage`; declared fields named in `base` are filled from there
    unless the stage section sets them itself (null counts as unset, so `rft: {seed: null}`
    documents the key in params.yaml and still follows `base.seed`). See the module docstring
    for the seed rule."""
    params = load_params(path) if params is None else params
    if stage not in params:
        raise ConfigError(f"{path}: missing section '{stage}'")
    section = params[stage] if params[stage] is not None else {}
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: section '{stage}': expected a mapping of keys, got {type(section).__name__}")
    section = dict(section)
    base = params.get("base")
    if base is not None and not isinstance(base, dict):
        raise ConfigError(f"{path}: section 'base': expected a mapping (e.g. base: {{seed: 0}}), got {base!r}")
    base = base or {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    where = f"{path}: section '{stage}'"
    if "seed" in names and section.get("seed") is None:
        seed = base.get("seed")
        if seed is None:
            # The section's own errors first (they are what a person is editing); the seed's after.
            build(cls, {**section, "seed": 0}, where)
            raise ConfigError(f"{path}: section 'base': missing key 'seed'; every stage takes its seed from "
                              f"base.seed (unless its own section sets one): add `base: {{seed: 0}}`")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ConfigError(f"{path}: section 'base'.seed: expected an integer >= 0, got {seed!r}")
    for k, v in base.items():
        if k in names and section.get(k) is None:
            section[k] = v
    return build(cls, section, where)


def _target(fn: Callable[..., Any]) -> Callable[..., Any]:
    return fn.__init__ if isinstance(fn, type) else fn  # type: ignore[misc]


def check_options(fn: Callable[..., Any], options: Any, where: str, reserved: tuple[str, ...] = ()) -> None:
    """Check keyword `options` against the signature of `fn` (a function, or a class's
    `__init__`) before anything runs: an unknown key, a key the caller sets itself (`reserved`),
    a missing required one, or a value of the wrong type for its annotation is a ConfigError
    naming `where.<key>`. `where` is the options' full key path, e.g. "sample.backend_options".
    A `**kwargs` parameter lets unknown keys through, unless `fn` names where it forwards them
    in a `forwards_options_to` attribute (then they are checked against that callable)."""
    if options is None:
        return
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: expected a mapping of options, got {type(options).__name__} {options!r}"[:300])
    named, var_kw, hints = _signature(fn)
    forward = getattr(fn, "forwards_options_to", None)
    f_named: dict[str, inspect.Parameter] = {}
    if forward is not None:
        f_named, var_kw, f_hints = _signature(forward)
        hints = {**f_hints, **hints}
    allowed = sorted((set(named) | set(f_named)) - set(reserved))
    for key, value in options.items():
        path = f"{where}.{key}"
        if key in reserved:
            raise ConfigError(f"{path}: set by the stage itself, not an option here")
        if key not in named and key not in f_named:
            if var_kw:
                continue  # passed through (e.g. vLLM engine arguments): the callee checks them
            raise ConfigError(f"{path}: unknown option; allowed options are {allowed}")
        if key in hints:
            _coerce(value, hints[key], path)
            if value is not None and hints[key] is float and not isinstance(value, bool) \
                    and isinstance(value, (int, float)) and not math.isfinite(value):
                raise ConfigError(f"{path}: expected a finite number, got {value!r}")
    missing = [n for n, p in named.items() if p.default is inspect.Parameter.empty
               and n not in options and n not in reserved]
    if missing:
        raise ConfigError(f"{where}: missing required option(s) {missing}")


def _signature(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool, dict[str, Any]]:
    target = _target(fn)
    params = [p for p in inspect.signature(target).parameters.values() if p.name != "self"]
    named = {p.name: p for p in params
             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that names something not importable here: skip type checks
        hints = {}
    hints.pop("return", None)
    return named, var_kw, hints


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
        bounds = ", ".join(f"{sign} {f.metadata[k]}" for k, (sign, _) in _BOUNDS.items() if k in f.metadata)
        lines.append(f"  {f.name}{default}{f' [{bounds}]' if bounds else ''}: {f.metadata.get('help', '')}")
    return "\n".join(lines)


# --- errors a person fixes: one line, not a traceback ------------------------------------------

def _one_line_errors(kind: type[BaseException], err: BaseException, tb: Any) -> None:
    """A stage stopped by a ConfigError or InputError prints `error: <message>` on one line (the
    message names file, line/section and field); anything else keeps its traceback. The exit
    status stays 1."""
    if issubclass(kind, (ConfigError, InputError)):
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return
    _previous_hook(kind, err, tb)


_previous_hook = sys.excepthook
if sys.excepthook is sys.__excepthook__:  # leave a hook someone else installed alone
    sys.excepthook = _one_line_errors
