"""Content fingerprints for resume keys, caches and lineage: what a row depends on, by content,
not path.

`dir_digest(model_dir)` hashes the relative names, sizes and bytes of every file of a model
directory (weights, tokenizer, chat template, generation config), so two copies of the same
model on two machines agree, and a retrained model in the same path does not. `meta.json` is left
out by default: it records when and from what a model was made, which changes nothing it
generates. `code_digest("steps.sample", ...)` hashes the source files of the modules that turn
inputs into rows, so a resumed run never mixes rows made by older code into new results.
"""
from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable
from pathlib import Path

_CHUNK = 1 << 20


def _update_file(h: "hashlib._Hash", path: Path) -> None:
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)


def dir_digest(path: Path | str, exclude: Iterable[str] = ("meta.json",)) -> str:
    """sha256 over (relative name, size, bytes) of every file under `path`, in sorted order;
    files whose relative path is in `exclude` are skipped. A file gives the digest of its
    bytes; a missing path is an error (an empty digest would match every other missing one)."""
    root = Path(path)
    excluded = set(exclude)
    h = hashlib.sha256()
    if root.is_file():
        _update_file(h, root)
        return h.hexdigest()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such model directory or file")
    for p in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel in excluded:
            continue
        # Name and size delimit each file, so moving bytes from one file to the next changes it.
        h.update(f"\0{rel}\0{p.stat().st_size}\0".encode())
        _update_file(h, p)
    return h.hexdigest()


def code_digest(*modules: str) -> str:
    """sha256 of the source files of the named modules (e.g. "steps.sample"), whatever order
    they are named in; imports nothing, so heavy back ends (vLLM) need not be installed."""
    h = hashlib.sha256()
    for name in sorted(modules):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not Path(spec.origin).is_file():
            raise ModuleNotFoundError(f"code_digest: no source file for module {name!r}")
        h.update(f"\0{name}\0".encode())
        _update_file(h, Path(spec.origin))
    return h.hexdigest()
