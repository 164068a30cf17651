"""pandera schemas: the contract of every file that crosses a stage boundary.

Each stage validates what it writes and what it reads with `validate(rows, SCHEMA, path)`,
which turns pandera's report into one message naming the file, the line (1-based, as in the
JSONL file) and the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pandera.pandas as pa

from steps.core.io import InputError, iter_jsonl

DATASETS = ("musique", "ecommerce")


def _list_of(kind: type | tuple[type, ...]):
    def check(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, kind) and not isinstance(x, bool) for x in v)
    return pa.Check(lambda s: s.map(check), element_wise=False,
                    error=f"must be a list of {getattr(kind, '__name__', kind)}")


def _turns(v: Any) -> bool:
    return isinstance(v, list) and all(
        isinstance(t, dict) and set(t) == {"role", "content"} and t["role"] in ("user", "assistant")
        and isinstance(t["content"], str) for t in v)


_NONEMPTY = pa.Check(lambda s: s.str.strip().str.len() > 0, error="must be a non-empty string")
_FRACTION = pa.Check.in_range(0.0, 1.0)

EXAMPLES = pa.DataFrameSchema(
    {
        "id": pa.Column(str, _NONEMPTY, unique=True),
        "dataset": pa.Column(str, pa.Check.isin(DATASETS)),
        "documents": pa.Column(object, [_list_of(str),
                                        pa.Check(lambda s: s.map(len) > 0, error="must hold at least one document")]),
        "history": pa.Column(object, pa.Check(lambda s: s.map(_turns),
                                              error="must be a list of {role: user|assistant, content: str}")),
        "question": pa.Column(str, _NONEMPTY),
        "answers": pa.Column(object, _list_of(str)),
        "gold_doc_idxs": pa.Column(object, _list_of(int)),
        "helpful_doc_idxs": pa.Column(object, _list_of(int)),
        "bridge": pa.Column(object, _list_of(str)),
        "hops": pa.Column(int, pa.Check.ge(1)),  # reasoning steps (MuSiQue: from the id; e-commerce: 1)
    },
    checks=[pa.Check(lambda df: df.apply(lambda r: all(0 <= i < len(r["documents"])
                                                       for i in r["gold_doc_idxs"] + r["helpful_doc_idxs"]), axis=1),
                     error="gold_doc_idxs/helpful_doc_idxs must index into documents")],
    strict=True, coerce=False, name="examples",
)

_CANDIDATE_COLUMNS = {
    "id": pa.Column(str, _NONEMPTY),
    "dataset": pa.Column(str, pa.Check.isin(DATASETS)),
    "sample_idx": pa.Column(int, pa.Check.ge(0)),
    "completion": pa.Column(str),
    "thinking": pa.Column(str),
    "response": pa.Column(str),
    "completion_tokens": pa.Column(int, pa.Check.ge(0)),
    "finish_reason": pa.Column(str, pa.Check.isin(("stop", "length"))),
    "model": pa.Column(str, _NONEMPTY),
}
CANDIDATES = pa.DataFrameSchema(
    _CANDIDATE_COLUMNS, unique=["id", "sample_idx"], strict=True, name="candidates")

JUDGED = pa.DataFrameSchema(
    {**_CANDIDATE_COLUMNS,
     "correct": pa.Column(int, pa.Check.isin((0, 1))),
     "helpful": pa.Column(int, pa.Check.isin((0, 1))),
     "rationale": pa.Column(str),
     "keep": pa.Column(bool)},
    unique=["id", "sample_idx"], strict=True, name="judged")

PREDICTIONS = pa.DataFrameSchema(
    {
        "model": pa.Column(str, _NONEMPTY),
        "dataset": pa.Column(str, pa.Check.isin(DATASETS)),
        "id": pa.Column(str, _NONEMPTY),
        "hops": pa.Column(int, pa.Check.ge(1)),  # the example's, for per-hop reporting
        "completion": pa.Column(str),
        "response": pa.Column(str),
        "predicted_answer": pa.Column(str),
        "em": pa.Column(float, _FRACTION, nullable=True),
        "f1": pa.Column(float, _FRACTION, nullable=True),
        "correct": pa.Column(int, pa.Check.isin((0, 1))),
        "helpful": pa.Column(int, pa.Check.isin((0, 1))),
        "completion_tokens": pa.Column(int, pa.Check.ge(0)),
        # tokens of the completion inserted from outside the policy (a teacher's relay, a routed answer)
        "external_tokens": pa.Column(int, pa.Check.ge(0)),
        "decode_tflops": pa.Column(float, pa.Check.ge(0)),
        "prefill_tflops": pa.Column(float, pa.Check.ge(0)),
        "latency_s": pa.Column(float, pa.Check.ge(0)),
        # a protocol's own numbers per response (calls, cost, ...): the report averages each
        "extras": pa.Column(object, pa.Check(lambda s: s.map(lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, (int, float)) for k, x in v.items())), element_wise=False)),
    },
    unique=["model", "dataset", "id"], strict=True, name="predictions")


def validate(rows: list[dict[str, Any]] | pd.DataFrame, schema: pa.DataFrameSchema,
             path: Path | str) -> pd.DataFrame:
    """Validate rows against `schema`; on failure raise InputError naming file, line and field.

    Row i of `rows` is reported as line i+1 (the JSONL line it was read from or will be
    written to)."""
    df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(rows)
    if df.empty:
        # No row can break a rule; an empty object frame would only fail the string dtypes
        # (an empty dev split, dev_fraction 0, is a valid output).
        return pd.DataFrame({c: pd.Series(dtype=object) for c in schema.columns})
    df = df.reset_index(drop=True)
    try:
        return schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as err:
        raise InputError(f"{path}: {schema.name} schema: " + _describe(err.failure_cases)) from None


def _describe(cases: pd.DataFrame) -> str:
    msgs: list[str] = []
    seen: set[tuple[Any, ...]] = set()
    for _, c in cases.iterrows():
        index = None if pd.isna(c.get("index")) else int(c["index"])
        check = str(c.get("check"))
        if check == "column_in_dataframe":
            key, msg = (check, c["failure_case"]), f"missing field '{c['failure_case']}'"
        elif check.startswith("column_in_schema"):
            key, msg = (check, c["failure_case"]), f"unexpected field '{c['failure_case']}'"
        elif c.get("schema_context") == "DataFrameSchema":
            key, msg = (index, check), f"line {index + 1}: {check}" if index is not None else check
        else:
            line = "" if index is None else f"line {index + 1}: "
            key = (index, c.get("column"), check)
            msg = f"{line}field '{c.get('column')}': {check} (got {c.get('failure_case')!r})"
        if key not in seen:
            seen.add(key)
            msgs.append(msg)
    shown = "; ".join(msgs[:5])
    return shown + (f"; and {len(msgs) - 5} more" if len(msgs) > 5 else "")


def read_validated(path: Path | str, schema: pa.DataFrameSchema) -> list[dict[str, Any]]:
    """Read a JSONL file and validate it; returns plain dict rows."""
    rows = [obj for _, obj in iter_jsonl(path)]
    validate(rows, schema, path)
    return rows
