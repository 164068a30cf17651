"""Rewards: pure functions registered by name, weighted in params, runnable from the command line.

A reward factory takes its options (params `<stage>.rewards.<name>`, minus `weight`) and returns
`reward(completions, **columns) -> list[float | None]` in TRL's calling convention: `completions`
are the decoded completions and `columns` the dataset columns (one entry per completion), plus
`completion_ids` and, from the rollout (steps.core.rollouts), `policy_tokens` (the completion's
tokens written by the policy: a length reward counts those, never inserted ones). Training
(steps.core.rl) and evaluation use the same functions, so a number in a report and a number in
training mean the same thing; the trainer adds them as Σ wᵢ·rᵢ (TRL's reward_weights).

Rewards are discovered: every module of this package that defines `REWARDS = {name: factory}`
contributes, so a method adds `steps/core/rewards/<method>.py` and edits nothing shared.

    python -m steps.core.rewards score --reward length --options '{"lambda_upper": 0.4}' ROWS.jsonl
    python -m steps.core.rewards list
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from steps.core.plugins import discover

RewardFn = Callable[..., list[float | None]]


REWARDS: dict[str, Callable[..., RewardFn]] = discover(__name__, __path__, "REWARDS")
# Columns some reward reads that examples do not carry (a method's stage or rollout adds them),
# each with an example value: declared by the reward's module as `COLUMNS = {name: value}`.
COLUMNS: dict[str, Any] = discover(__name__, __path__, "COLUMNS")


def check_spec(spec: dict[str, Any], where: str) -> None:
    """Every reward of `spec` is registered and its options are its factory's keyword arguments
    of the right type; errors name the full key path (e.g. `grpo.rewards.length.lamda_lower`)."""
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: expected a mapping of reward name -> options, got {spec!r}")
    for name, opts in spec.items():
        if name not in REWARDS:
            raise ValueError(f"{where}.{name}: reward {name!r} is not registered; known: {sorted(REWARDS)}")
        opts = opts or {}
        if not isinstance(opts, dict):
            raise ValueError(f"{where}.{name}: expected a mapping of options, got {opts!r}")
        params = inspect.signature(REWARDS[name]).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        for key, value in opts.items():
            if key == "weight":
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise ValueError(f"{where}.{name}.weight: expected a number, got {value!r}")
                continue
            if key not in params and not takes_any:
                raise ValueError(f"{where}.{name}.{key}: unknown option; {name} takes "
                                 f"{sorted(['weight', *(k for k in params if params[k].kind is not params[k].VAR_KEYWORD)])}")
            default = params[key].default if key in params else inspect.Parameter.empty
            if (isinstance(default, (int, float)) and not isinstance(default, bool)
                    and (not isinstance(value, (int, float)) or isinstance(value, bool))):
                raise ValueError(f"{where}.{name}.{key}: expected a number, got {value!r}")
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"{where}.{name}.{key}: expected true or false, got {value!r}")
            if isinstance(default, str) and not isinstance(value, str):
                raise ValueError(f"{where}.{name}.{key}: expected a string, got {value!r}")


def make_rewards(spec: dict[str, dict[str, Any]]) -> tuple[list[RewardFn], list[float]]:
    """spec: {name: {weight: w, ...factory options}} -> (functions, weights) for the trainer."""
    check_spec(spec, "rewards")
    fns, weights = [], []
    for name, opts in spec.items():
        opts = dict(opts or {})
        weights.append(float(opts.pop("weight", 1.0)))
        fn = REWARDS[name](**opts)
        fn.__name__ = name
        fns.append(fn)
    return fns, weights
