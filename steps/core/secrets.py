"""Secrets stay in the environment: never in params.yaml, dvc.lock, MLflow, meta.json or logs.

A params key names the environment variable that holds a secret (`api_key_env: OPENAI_API_KEY`);
the back end reads the variable when it starts. `find_secrets` finds what must not be in params
(keys named like secrets, values shaped like keys or tokens, URLs with a password) so that
`steps.core.config.load_params` refuses them before any stage runs: a refused params file never
reaches DVC, which records the params values of a stage in dvc.lock. `redact` blanks the same
things in whatever tracking is about to log, as a second line of defence.
"""
from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***redacted***"

# Key names (lower-cased, `-` read as `_`) that hold a secret. `max_new_tokens` and `tokenizer` do
# not match: the name has to *end* in one of these words. A key ending in `_env` names a variable
# and is what we ask for.
_SECRET_KEY = re.compile(
    r"(^|_)(api_?key|apikey|access_?key|secret_?key|private_?key|secret|secrets|password|passwd|passphrase|"
    r"token|auth|authorization|bearer|credential|credentials|cookie)$")

# Values that are secrets whatever their key: OpenAI-style keys, bearer headers, GitHub, Hugging
# Face, AWS, Slack tokens, and URLs that carry a password (`https://user:pw@host`).
_SECRET_VALUE = re.compile(
    r"\bsk-[A-Za-z0-9_\-]{16,}|\bBearer\s+[A-Za-z0-9._~+/\-]{8,}|\bgh[pousr]_[A-Za-z0-9]{20,}|"
    r"\bhf_[A-Za-z0-9]{20,}|\bAKIA[0-9A-Z]{16}\b|\bxox[abprs]-[A-Za-z0-9\-]{10,}|"
    r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)", re.IGNORECASE)


def secret_key(name: Any) -> bool:
    """Whether a params/config key names a secret (`api_key`, `hf_token`, `password`, ...)."""
    return isinstance(name, str) and bool(_SECRET_KEY.search(name.lower().replace("-", "_")))


def secret_value(value: Any) -> bool:
    """Whether a value looks like a key or token, whatever key it sits under."""
    return isinstance(value, str) and bool(_SECRET_VALUE.search(value))


def find_secrets(obj: Any, path: str = "") -> list[str]:
    """Key paths (`sample.backend_options.api_key`) under which `obj` holds a literal secret.
    A secret-named key set to null or "" holds nothing and is not reported."""
    found: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            where = f"{path}.{k}" if path else str(k)
            if secret_key(k) and v not in (None, "") and not isinstance(v, (dict, list, tuple)):
                found.append(where)
            else:
                found += find_secrets(v, where)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found += find_secrets(v, f"{path}[{i}]")
    elif secret_value(obj):
        found.append(path)
    return found


def redact(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, scalars) with secret-named keys' values and secret-shaped
    strings replaced by REDACTED."""
    if isinstance(obj, dict):
        return {k: (REDACTED if secret_key(k) and v not in (None, "") and not isinstance(v, (dict, list, tuple))
                    else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    if isinstance(obj, str) and secret_value(obj):
        return _SECRET_VALUE.sub(REDACTED, obj)
    return obj


def from_env(var: str | None, what: str, required: bool = False) -> str | None:
    """The secret in environment variable `var` (None when `var` is None or unset and not
    `required`); `what` names the option in the error, e.g. "sample.backend_options.api_key_env"."""
    if not var:
        return None
    value = os.environ.get(var)
    if value is None and required:
        raise ValueError(f"{what}: environment variable {var!r} is not set")
    return value


def how_to(path: str) -> str:
    """The fix for a literal secret found at key path `path`."""
    key = path.rsplit(".", 1)[-1].split("[", 1)[0]
    var = re.sub(r"[^A-Z0-9]+", "_", key.upper()).strip("_") or "SECRET"
    return (f"secrets do not go into params (DVC copies params into dvc.lock, MLflow logs them): put it in an "
            f"environment variable and name the variable instead, e.g. `{key}_env: {var}` "
            f"(the back ends' `api_key_env` defaults to OPENAI_API_KEY)")
