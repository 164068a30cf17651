"""Discovery of a package's plugins: every module of the package that defines a mapping named
`attr` contributes its entries, so a method adds a module and edits nothing shared."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any


def discover(package: str, path: list[str], attr: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for mod in pkgutil.iter_modules(path):
        if mod.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package}.{mod.name}")
        for name, entry in getattr(module, attr, {}).items():
            if name in found:
                raise ValueError(f"{package}: {attr} entry {name!r} is defined twice (again in {module.__name__})")
            found[name] = entry
    return found
