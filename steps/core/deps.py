"""Which source files a stage runs: the transitive `steps.*` imports of its module.

DVC re-runs a stage when one of its declared deps changes, so a dvc.yaml that misses a module a
stage imports leaves its outputs stale while `dvc status` says all is well. This module reads
the imports (module level and inside functions, since the stages import heavy things lazily),
the "steps.x:Name" strings of the lazy registries (back ends, judges), and every module of a
package that discovers its modules at import time (rollouts, rewards); `check` compares the
result with dvc.yaml, and tests/test_dvc_deps.py fails on any gap.

    python -m steps.core.deps            # every stage's missing deps (exit 1 if any)
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
_STRING_REF = re.compile(r"^(steps(?:\.\w+)+)(?::\w+)?$")


def module_file(name: str, root: Path = ROOT) -> Path | None:
    base = root / Path(*name.split("."))
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.exists():
            return p
    return None


def _references(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name == "__init__.py":
        pkg = pkg.rsplit(".", 1)[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = pkg if path.name == "__init__.py" else pkg.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    parent = parent.rsplit(".", 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = _STRING_REF.match(node.value)
            if m:
                names.add(m.group(1))
    if path.name == "__init__.py" and "discover(__name__, __path__" in path.read_text():
        names.update(f"{pkg}.{p.stem}" for p in path.parent.glob("*.py") if p.name != "__init__.py")
    return {n for n in names if n == "steps" or n.startswith("steps.")}


def closure(module: str, root: Path = ROOT) -> set[Path]:
    """Source files of `module` and of every steps.* module it reaches (packages' __init__ too)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        parts = name.split(".")
        # importing a.b.c runs a/__init__, a/b/__init__ as well
        for i in range(1, len(parts) + 1):
            f = module_file(".".join(parts[:i]), root)
            if f is not None and f not in seen:
                seen.add(f)
                todo.extend(_references(f))
    return {f for f in seen if not _docstring_only(f)}


def _docstring_only(path: Path) -> bool:
    """An `__init__.py` holding nothing but a docstring cannot change what a stage does (and if
    code is added to it, it stops being one and the check asks for it)."""
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def stage_module(cmd: str) -> str | None:
    m = re.search(r"python -m (steps\.\w+)", cmd)
    return m.group(1) if m else None


def missing_deps(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, list[str]]:
    """Per stage of dvc.yaml (foreach stages once, by name), the source files it runs that no dep covers."""
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    out: dict[str, list[str]] = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        module = stage_module(" ".join(body["cmd"]) if isinstance(body["cmd"], list) else body["cmd"])
        if module is None:
            continue
        deps = [Path(d) for d in body.get("deps", []) if "${" not in str(d)]
        files = sorted(f.relative_to(ROOT) for f in closure(module))
        gaps = [str(f) for f in files if not any(f == d or d in f.parents for d in deps)]
        if gaps:
            out[name] = gaps
    return out


def main() -> int:
    gaps = missing_deps()
    for stage, files in gaps.items():
        print(f"dvc.yaml: stage {stage!r} runs {files} but does not list them as deps")
    return 1 if gaps else 0


if __name__ == "__main__":
    sys.exit(main())
