"""File I/O that never leaves half-written outputs and names the file and line of bad input.

In a stage launched on several processes (steps.core.launch) only the main one writes: the
others' atomic writes are discarded, so an output is written once however the stage runs."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates its file 0600; an output renamed from it would be unreadable to the rest of a
# team (a shared data volume, a container running as another user), so it gets the mode a plain
# open() would have given it.
_FILE_MODE = 0o666 & ~_umask()


class InputError(ValueError):
    """Bad input data; the message names the file, the line (1-based) and the field."""


def is_main_process() -> bool:
    """Rank 0 of a launched run (torchrun, which `accelerate launch` runs, sets RANK), or a plain
    process. Read here rather than from steps.core.launch, so that every stage's code stays free
    of the launcher (and of its dvc.yaml deps)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def atomic_path(path: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds
    (and this is the main process: module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if is_main_process():
            os.chmod(tmp_path, _FILE_MODE)
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path | str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path | str, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json(path: Path | str) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from None


def iter_jsonl(path: Path | str, *, tolerate_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object). A final line without a newline that does not parse is a
    torn write from a killed process when `tolerate_torn_tail` is set (resume shards), and an
    error otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    with path.open("rb") as f:
        lines = f.read().split(b"\n")
    last = len(lines)
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            if tolerate_torn_tail and lineno == last:
                return
            raise InputError(f"{path}: line {lineno}: invalid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}: line {lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path: Path | str) -> list[dict[str, Any]]:
    return [obj for _, obj in iter_jsonl(path)]


class ShardWriter:
    """Append-only JSONL shards for resumable stages.

    Each flush writes one complete shard file atomically, so a process killed at any moment
    leaves only whole shards behind; `done_keys` reads them back on restart so no work is lost
    and nothing is written twice.
    """

    def __init__(self, directory: Path | str, key_fields: tuple[str, ...]):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key_fields = key_fields
        self._next = len(list(self.dir.glob("part-*.jsonl")))

    def key(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[k] for k in self.key_fields)

    def rows(self) -> list[dict[str, Any]]:
        """All rows written so far, first occurrence of each key only."""
        seen: set[tuple[Any, ...]] = set()
        out = []
        for shard in sorted(self.dir.glob("part-*.jsonl")):
            for _, row in iter_jsonl(shard, tolerate_torn_tail=True):
                k = self.key(row)
                if k not in seen:
                    seen.add(k)
                    out.append(row)
        return out

    def done_keys(self) -> set[tuple[Any, ...]]:
        return {self.key(r) for r in self.rows()}

    def append(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        while (self.dir / f"part-{self._next:06d}.jsonl").exists():
            self._next += 1
        write_jsonl(self.dir / f"part-{self._next:06d}.jsonl", rows)
        self._next += 1


def write_train_log(path: Path | str, history: list[dict[str, Any]]) -> None:
    """A trainer's per-step log as CSV, `step` first, one column per key any step logged (the
    DVC plots and the ablation report read it)."""
    keys = sorted({k for h in history for k in h if k != "step"})
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", *keys])
        w.writeheader()
        w.writerows(history)
