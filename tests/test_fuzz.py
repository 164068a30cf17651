"""A fuzz harness for ingest rows and params sections (issue 11), with hypothesis.

Generated corruptions of real rows and params never produce a traceback: only an InputError or
a ConfigError naming the file and the field (and the line, or the section and key); never a
partial output; and never a silent acceptance of a value the oracle here calls invalid, nor the
refusal of one it calls valid. Bounded: `max_examples` keeps each property to a few seconds.
"""
from __future__ import annotations

import dataclasses
import json
import math
import tempfile
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from steps.core import synth
from steps.core.config import ConfigError, load_config, load_params
from steps.core.io import InputError
from steps.ingest import main as ingest_main

# derandomize: the same examples on every run (a CI failure reproduces); no example database.
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True,
                database=None)

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
JSON_VALUES = st.recursive(
    JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner,
                                                                                       max_size=3)), max_leaves=6)

# --- ingest rows --------------------------------------------------------------------------------

# field -> whether a value is valid there (the oracle), per record kind; nested: (list field, item field)
_STR = lambda v: isinstance(v, str) and bool(v.strip())  # noqa: E731
_OPT_STR = lambda v: v is None or isinstance(v, str)  # noqa: E731
_OPT_BOOL = lambda v: v is None or isinstance(v, bool)  # noqa: E731
_OPT_STRS = lambda v: v is None or (isinstance(v, list) and all(isinstance(x, str) for x in v))  # noqa: E731
_INT = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
ORACLE = {
    "musique": {"id": _STR, "question": _STR, "answer": _STR, "answer_aliases": _OPT_STRS, "answerable": _OPT_BOOL,
                ("paragraphs", "paragraph_text"): _STR, ("paragraphs", "title"): _OPT_STR,
                ("paragraphs", "is_supporting"): _OPT_BOOL},
    "ecommerce": {"qid": lambda v: _STR(v) or _INT(v), "question": _STR, "reference_answers": _OPT_STRS,
                  "product_title": _OPT_STR, ("documents", "text"): _STR,
                  ("documents", "label"): lambda v: v is None or (_INT(v) and v in (0, 1, 2))},
}


def _ingest(kind: str, lines: list[str]) -> tuple[Exception | None, Path, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-ingest-"))
    src = tmp / f"{kind}.jsonl"
    src.write_text("".join(line + "\n" for line in lines))
    (tmp / "params.yaml").write_text(f"base: {{seed: 0}}\ningest:\n  sources: [{kind}]\n  {kind}_path: {src}\n"
                                     "  eval_fraction: 0.5\n")  # 10 rows: both splits get some
    out = tmp / "out"
    try:
        ingest_main(["--params", str(tmp / "params.yaml"), "--out", str(out)])
    except InputError as e:
        return e, src, out
    return None, src, out


@st.composite
def corrupted_rows(draw):
    kind = draw(st.sampled_from(["musique", "ecommerce"]))
    rows = synth.musique_rows(10, 0) if kind == "musique" else synth.ecommerce_rows(10, 0)
    line = draw(st.integers(0, 9))
    action = draw(st.sampled_from(["set", "drop", "junk", "extra"]))
    field = draw(st.sampled_from(sorted(ORACLE[kind], key=str)))
    value = draw(JSON_VALUES)
    return kind, rows, line, action, field, value


@FUZZ
@given(corrupted_rows())
def test_corrupt_ingest_rows_are_named_or_accepted_never_a_traceback(case):
    kind, rows, line, action, field, value = case
    row = rows[line]
    target, key = (row, field) if isinstance(field, str) else (row[field[0]][0], field[1])
    if action == "set":
        target[key] = value
        valid = ORACLE[kind][field](value)
    elif action == "drop":
        target.pop(key, None)
        valid = ORACLE[kind][field](None)
    elif action == "extra":
        target[f"x_{key}"] = value  # unknown fields are ignored, as the official files have extras
        valid = True
    else:
        valid = False
    lines = [json.dumps(r) for r in rows]
    if action == "junk":
        junk = json.dumps(value)
        assume(not isinstance(value, dict))  # a JSON object would be a (bad) record, not junk
        lines[line] = junk
    error, src, out = _ingest(kind, lines)
    if valid:
        assert error is None, f"a valid value was refused: {field}={value!r}: {error}"
        assert (out / "train.jsonl").exists() and (out / "stats.json").exists()
        return
    assert error is not None, f"an invalid value was accepted: {field}={value!r}"
    msg = str(error)
    assert msg.startswith(f"{src}: line {line + 1}: "), msg
    if action != "junk":
        name = field if isinstance(field, str) else f"{field[0]}[0].{field[1]}"
        assert f"field '{name}" in msg, msg
    assert not out.exists() or not any(out.rglob("*")), "a partial output was left"


@FUZZ
@given(st.lists(st.text(max_size=40).filter(lambda t: "\n" not in t), min_size=1, max_size=4))
def test_arbitrary_lines_in_a_source_file_never_a_traceback(lines):
    error, src, out = _ingest("ecommerce", lines)
    if error is not None:
        assert str(error).startswith(f"{src}: ") and not (out.exists() and any(out.rglob("*"))), str(error)


# --- params sections ----------------------------------------------------------------------------

def _stage_configs() -> dict[str, type]:
    from steps import export, ingest, judge, pretrain_demo, promote, rft, sample
    return {"ingest": ingest.IngestConfig, "pretrain_demo": pretrain_demo.PretrainDemoConfig,
            "sample": sample.SampleConfig, "judge": judge.JudgeConfig, "rft": rft.RftConfig,
            "promote": promote.PromoteConfig, "export": export.ExportConfig}


# A section that builds as it is, for the stages whose defaults alone do not.
BASE_SECTIONS = {"pretrain_demo": {"teacher_path": "t", "student_path": "s"}}


def _kind(annotation) -> type | None:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    ann = args[0] if args and typing.get_origin(annotation) is not tuple else annotation
    ann = typing.get_origin(ann) or ann
    return ann if ann in (int, float, str, bool, dict, tuple) else None


def _fields():
    out = []
    for section, cls in _stage_configs().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if _kind(hints[f.name]) is not None:
                out.append((section, cls, f, hints[f.name]))
    return out


FIELDS = _fields()


def _wrong_type(kind: type):
    wrong = {int: st.one_of(st.text(min_size=1, max_size=5), st.booleans(), st.floats(allow_nan=False).filter(
                 lambda x: x != int(x) if math.isfinite(x) else True), st.lists(st.integers(), max_size=2)),
             float: st.one_of(st.text(min_size=1, max_size=5), st.booleans(), st.lists(st.integers(), max_size=2),
                              st.just(float("nan"))),
             str: st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2),
                            st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
             bool: st.one_of(st.integers(), st.text(min_size=1, max_size=5)),
             dict: st.one_of(st.integers(), st.text(min_size=1, max_size=5), st.lists(st.integers(), max_size=2)),
             tuple: st.one_of(st.integers(), st.text(min_size=1, max_size=5), st.booleans())}
    return wrong[kind]


def _load(section: str, cls: type, values: dict) -> tuple[ConfigError | None, Path]:
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-params-"))
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"base": {"seed": 0}, section: {**BASE_SECTIONS.get(section, {}), **values}}))
    try:
        load_config(cls, section, path)
    except ConfigError as e:
        return e, path
    return None, path


@FUZZ
@given(st.sampled_from(FIELDS), st.data())
def test_wrong_types_are_refused_naming_file_section_and_key(field, data):
    section, cls, f, annotation = field
    value = data.draw(_wrong_type(_kind(annotation)))
    assume(not (_kind(annotation) is float and isinstance(value, bool) is False and isinstance(value, (int, float))
                and math.isfinite(value)))
    error, path = _load(section, cls, {f.name: value})
    assert error is not None, f"{section}.{f.name}: {value!r} was accepted"
    assert str(error).startswith(f"{path}: section '{section}'") and f.name in str(error), str(error)


BOUNDED = [(s, c, f, a) for s, c, f, a in FIELDS if {"ge", "gt", "le", "lt"} & set(f.metadata)]


@FUZZ
@given(st.sampled_from(BOUNDED), st.data())
def test_numbers_are_refused_outside_their_bounds_and_accepted_inside(field, data):
    section, cls, f, annotation = field
    meta, is_int = f.metadata, _kind(annotation) is int
    number = st.integers(-10**9, 10**9) if is_int else st.floats(-1e9, 1e9, allow_nan=False)
    value = data.draw(number)
    inside = (("ge" not in meta or value >= meta["ge"]) and ("gt" not in meta or value > meta["gt"])
              and ("le" not in meta or value <= meta["le"]) and ("lt" not in meta or value < meta["lt"]))
    error, path = _load(section, cls, {f.name: value})
    if inside:
        # Only a rule between fields may refuse it, and it names the section too.
        assert error is None or str(error).startswith(f"{path}: section '{section}'"), str(error)
        assert error is None or f.name not in str(error) or "must be" not in str(error), str(error)
    else:
        assert error is not None, f"{section}.{f.name}: {value!r} is out of bounds {dict(meta)} and was accepted"
        assert str(error).startswith(f"{path}: section '{section}'.{f.name}: must be "), str(error)


@FUZZ
@given(st.sampled_from(sorted(_stage_configs())), st.from_regex(r"[a-z][a-z_]{0,12}", fullmatch=True), JSON_VALUES)
def test_unknown_keys_are_refused_by_name(section, key, value):
    cls = _stage_configs()[section]
    assume(key not in {f.name for f in dataclasses.fields(cls)})
    error, path = _load(section, cls, {key: value})
    assert error is not None and str(error).startswith(f"{path}: section '{section}'"), str(error)
    assert repr(key) in str(error) or f"{key}:" in str(error) or f".{key}" in str(error), str(error)


@FUZZ
@given(st.text(max_size=80))
@example("{{}}")  # a mapping as a key: unhashable, once a TypeError from the duplicate-key check
def test_any_params_text_loads_or_is_one_config_error(text):
    path = Path(tempfile.mkdtemp(prefix="fuzz-yaml-")) / "params.yaml"
    path.write_bytes(text.encode("utf-8", errors="replace"))  # lone surrogates cannot be UTF-8
    try:
        params = load_params(path)
    except ConfigError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e), str(e)
        return
    assert isinstance(params, dict)
    for section, cls in _stage_configs().items():
        if section in params:
            try:
                load_config(cls, section, path, params)
            except ConfigError as e:
                assert str(e).startswith(f"{path}: "), str(e)


@FUZZ
@given(st.sampled_from(["api_key", "token", "password", "secret", "hf_token", "aws_secret_access_key"]),
       # key-like values: a one-character "secret" such as "." is in any error message by chance
       st.text(alphabet=st.characters(categories=["L", "N", "P"]), min_size=8, max_size=40),
       st.sampled_from(["sample", "judge"]))
def test_a_literal_secret_anywhere_is_refused(key, value, section):
    where = {"sample": "backend_options", "judge": "options"}[section]
    error, path = _load(section, _stage_configs()[section], {where: {key: value}})
    assert error is not None and str(error).startswith(f"{path}: {section}.{where}.{key}: a literal secret"), error
    assert value not in str(error).split(": a literal secret")[1]


@pytest.mark.parametrize("n", [0])
def test_the_harness_oracle_is_not_vacuous(n):
    """The fields the harness corrupts exist in the rows it corrupts (else it would test nothing)."""
    m, e = synth.musique_rows(1, 0)[0], synth.ecommerce_rows(1, 0)[0]
    for kind, row in (("musique", m), ("ecommerce", e)):
        for field in ORACLE[kind]:
            if isinstance(field, tuple):
                assert field[0] in row and isinstance(row[field[0]], list)
            elif field not in ("answer_aliases", "answerable", "reference_answers", "product_title"):
                assert field in row, (kind, field)
    assert len(BOUNDED) >= 30 and len(FIELDS) > len(BOUNDED)
