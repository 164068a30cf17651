"""The model registry: every model the pipeline evaluates, declared once in params.yaml `models`.

    models:
      rft_grpo: {stage: grpo, path: data/grpo/model, protocol: plain, compare_to: rft, seeds: [0, 1, 2]}

A row names the DVC stage that makes the model, the model directory, the decoding protocol of
its evaluation (a rollout in steps.core.rollouts: plain today; think / no_think and the methods'
own protocols register there), the row it is compared with, whether it is `fixed` (the same in
every run of a comparison: the teacher and the student base, reported once) and the seeds that
`make compare` trains it with, and whether it belongs to the main job (`main`). dvc.yaml evaluates each row (`evaluate@<name>`, a foreach over
this section), the report orders its tables by it, export picks a row by name, and the tests read
it: no list of models is written anywhere in code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steps.core.config import PARAMS_FILE, ConfigError, build, help_field, load_params


@dataclass(frozen=True)
class ModelRow:
    stage: str = help_field(help="the DVC stage that makes the model")
    path: str = help_field(help="its model directory (a DVC output of `stage`, or a local copy of a real model)")
    protocol: str = help_field("plain", "how it decodes in evaluation: a rollout of steps.core.rollouts")
    compare_to: str | None = help_field(None, "the row it is measured against in the report")
    fixed: bool = help_field(False, "the same model in every run of a comparison (reported once, never re-seeded)")
    seeds: tuple[int, ...] = help_field((0,), "seeds `make compare` trains it with (`<stage>.seed`)")
    main: bool = help_field(True, "part of the main job (`make run`, the Prefect flow's default); false: made by "
                                  "`dvc repro` and `make compare` only (the sibling methods)")
    options: dict = field(default_factory=dict, metadata={"help": "passed to the rollout (protocol options)"})
    name: str = help_field("", "the row's key (filled in)")

    def __post_init__(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be a non-empty list of distinct integers, got {list(self.seeds)}")


def load_registry(path: Path | str = PARAMS_FILE, params: dict[str, Any] | None = None) -> dict[str, ModelRow]:
    """The `models` section as rows, in file order; errors name the file, the row and the key."""
    from steps.core.rollouts import PROTOCOLS

    params = load_params(path) if params is None else params
    section = params.get("models")
    if not isinstance(section, dict) or not section:
        raise ConfigError(f"{path}: missing section 'models' (the model registry: one row per evaluated model)")
    rows: dict[str, ModelRow] = {}
    for name, spec in section.items():
        where = f"{path}: section 'models': row '{name}'"
        row = build(ModelRow, {**(spec or {}), "name": str(name)}, where)
        if row.protocol not in PROTOCOLS:
            raise ConfigError(f"{where}.protocol: unknown protocol {row.protocol!r}; registered: {sorted(PROTOCOLS)}")
        rows[str(name)] = row
    for row in rows.values():
        if row.compare_to is not None and row.compare_to not in rows:
            raise ConfigError(f"{path}: section 'models': row '{row.name}'.compare_to: no row {row.compare_to!r}; "
                              f"rows are {list(rows)}")
    return rows


def row(name: str, path: Path | str = PARAMS_FILE, params: dict[str, Any] | None = None) -> ModelRow:
    rows = load_registry(path, params)
    if name not in rows:
        raise ConfigError(f"{path}: section 'models': no row {name!r}; rows are {list(rows)}")
    return rows[name]


def side_stages(rows: dict[str, ModelRow]) -> set[str]:
    """DVC stages that only rows outside the main job need: their training stage (unless a main
    row comes from it too) and their evaluation."""
    main_stages = {r.stage for r in rows.values() if r.main}
    side = {r.stage for r in rows.values() if not r.main} - main_stages
    return side | {f"evaluate@{n}" for n, r in rows.items() if not r.main}
