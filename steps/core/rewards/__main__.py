"""Score a JSONL of rows with one registered reward, to debug it outside training.

    python -m steps.core.rewards score --reward length --options '{"lambda_upper": 0.4}' ROWS.jsonl
    python -m steps.core.rewards list

Each row: `completion` (the text), the dataset columns the reward reads (e.g. `ref_length`,
`answers`, `documents`, ...), optional `completion_ids` / `policy_tokens`, and optional `group`
(rows of one group are scored in one call, as the trainer scores the completions of one prompt;
rows without a group are scored together). Prints one JSON object per row, in input order, with
the row's `id` when it has one and its `reward`.
"""
from __future__ import annotations

import argparse
import inspect
import json
import sys
from typing import Any

from steps.core.io import InputError, iter_jsonl
from steps.core.rewards import COLUMNS, REWARDS, check_spec


def score(name: str, options: dict[str, Any], rows: list[dict[str, Any]], source: str = "rows") -> list[float | None]:
    check_spec({name: options}, "--options")
    fn = REWARDS[name](**{k: v for k, v in options.items() if k != "weight"})
    groups: dict[Any, list[int]] = {}
    for i, r in enumerate(rows):
        if "completion" not in r:
            raise InputError(f"{source}: row {i + 1}: missing field 'completion'")
        groups.setdefault(json.dumps(r.get("group")), []).append(i)
    out: list[float | None] = [None] * len(rows)
    for idx in groups.values():
        part = [rows[i] for i in idx]
        keys = sorted({k for r in part for k in r} - {"completion", "group"})
        for k in keys:
            lacking = [idx[j] + 1 for j, r in enumerate(part) if k not in r]
            if lacking:
                raise InputError(f"{source}: row {lacking[0]}: missing field {k!r} (other rows of its group have it)")
        try:
            values = fn([r["completion"] for r in part], **{k: [r[k] for r in part] for k in keys})
        except KeyError as e:
            raise InputError(f"{source}: rows {idx[0] + 1}-{idx[-1] + 1}: reward {name!r}: {e.args[0]}") from None
        for i, v in zip(idx, values, strict=True):
            out[i] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="registered rewards and their options")
    sc = sub.add_parser("score", help="score rows with one reward")
    sc.add_argument("--reward", required=True)
    sc.add_argument("--options", default="{}", help="the reward's options as JSON (as in params)")
    sc.add_argument("rows")
    args = ap.parse_args(argv)
    if args.command == "list":
        for name, factory in sorted(REWARDS.items()):
            print(f"{name}{inspect.signature(factory)}")
        print("columns beyond an example's own: " + ", ".join(f"{k} (e.g. {v!r})" for k, v in sorted(COLUMNS.items())))
        return 0
    try:
        options = json.loads(args.options)
        rows = [obj for _, obj in iter_jsonl(args.rows)]
        rewards = score(args.reward, options, rows, args.rows)
    except (InputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for r, value in zip(rows, rewards):
        print(json.dumps({**({"id": r["id"]} if "id" in r else {}), "reward": value}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
