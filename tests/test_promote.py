"""promote: gate decisions as tables, then the real thing against an MLflow registry (SQLite file)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from steps.core.config import ConfigError, build
from steps.core.io import InputError
from steps.promote import PromoteConfig, compare, decide, main, rollback_plan
from tests.helpers import TINY_DENSE, examples, tiny_model

CFG = PromoteConfig()


# candidate metrics, champion metrics, which checks fail (dataset/metric)
GATE_TABLE = [
    ({"m/correctness": 0.80, "m/tokens_per_response": 100}, {"m/correctness": 0.80, "m/tokens_per_response": 100}, []),
    ({"m/correctness": 0.795, "m/tokens_per_response": 90}, {"m/correctness": 0.80, "m/tokens_per_response": 100}, []),
    ({"m/correctness": 0.78, "m/tokens_per_response": 90}, {"m/correctness": 0.80, "m/tokens_per_response": 100},
     ["m/correctness"]),
    ({"m/correctness": 0.90, "m/tokens_per_response": 101}, {"m/correctness": 0.80, "m/tokens_per_response": 100},
     ["m/tokens_per_response"]),
    # a dataset the champion never saw cannot regress; one the candidate lacks fails
    ({"m/correctness": 0.8, "m/tokens_per_response": 9, "e/correctness": 0.1, "e/tokens_per_response": 9},
     {"m/correctness": 0.8, "m/tokens_per_response": 9}, []),
    ({"m/correctness": 0.8, "m/tokens_per_response": 9},
     {"m/correctness": 0.8, "m/tokens_per_response": 9, "e/correctness": 0.5}, ["e/correctness", "e/tokens_per_response"]),
]


@pytest.mark.parametrize("cand,champ,failing", GATE_TABLE)
def test_gates(cand, champ, failing):
    checks = compare(CFG, cand, champ)
    assert sorted(f"{c.dataset}/{c.metric}" for c in checks if not c.passed) == sorted(failing)
    for c in checks:
        assert f"{c.dataset}/{c.metric}" in c.reason


def test_decide_first_same_and_refused():
    first = decide(CFG, {"version": 1, "metrics": {}}, None)
    assert first["action"] == "promoted" and first["aliases"] == {"champion": 1}
    same = decide(CFG, {"version": 3, "metrics": {}}, {"version": 3, "metrics": {}})
    assert same["action"] == "unchanged" and same["aliases"] == {}
    nothing = decide(CFG, {"version": 2, "metrics": {"loss": 1.0}}, {"version": 1, "metrics": {"loss": 2.0}})
    assert nothing["action"] == "refused" and "no gated metric" in nothing["reasons"][0]


def test_rollback_plan_chain():
    plan = rollback_plan(CFG, 3, 2, {"promotion.previous_version": "1"})
    assert plan["aliases"] == {"champion": 2, "previous": 1}
    assert rollback_plan(CFG, 2, 1, {})["aliases"] == {"champion": 1, "previous": None}
    with pytest.raises(InputError, match="previous"):
        rollback_plan(CFG, 1, None, {})


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"gates.correctness.better"):
        build(PromoteConfig, {"gates": {"correctness": {"better": "up"}}}, "params.yaml: section 'promote'")
    with pytest.raises(ConfigError, match="unknown key"):
        build(PromoteConfig, {"gate": {}}, "params.yaml: section 'promote'")


# --- against a real MLflow registry ----------------------------------------------------------

@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """One SQLite tracking store for the module (its schema migration costs seconds); each
    test registers its own model name. Runs in a temp cwd so artefacts land there."""
    root = tmp_path_factory.mktemp("mlflow")
    saved = {k: os.environ.get(k) for k in ("PIPELINE_TRACKING", "MLFLOW_TRACKING_URI")}
    cwd = Path.cwd()
    os.environ["PIPELINE_TRACKING"] = "on"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({"promote": {"gates": {
        "correctness": {"better": "higher", "tolerance": 0.01},
        "tokens_per_response": {"better": "lower", "tolerance": 0.0}}}}))
    # Export registers an MLflow transformers model, so the bundle is a real (tiny) one.
    tiny_model(root / "bundle", TINY_DENSE, examples(2, 1))
    yield root
    os.chdir(cwd)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _register(root: Path, name: str, correctness: float, tokens: float) -> Path:
    """Register a version the way export does (metrics on its run) and write its registry.json."""
    from steps.core import tracking

    metrics = {"musique/correctness": correctness, "musique/tokens_per_response": tokens,
               "ecommerce/correctness": correctness, "ecommerce/tokens_per_response": tokens}
    out = tracking.register_bundle({"model_name": name}, root / "bundle", name, metrics, {"source": "test"})
    reg = root / name / f"registry-v{out['version']}.json"
    reg.parent.mkdir(exist_ok=True)
    reg.write_text(json.dumps({"model_name": name, **out}))
    return reg


def _promote(root: Path, reg: Path, *extra: str) -> dict:
    out = reg.parent / "promote"
    main(["--params", str(root / "params.yaml"), "--registry", str(reg), "--out", str(out), *extra])
    return json.loads((out / "decision.json").read_text())


def _state(name: str) -> tuple[int | None, int | None]:
    from steps.core import tracking

    return tracking.alias_version(name, "champion"), tracking.alias_version(name, "previous")


def test_first_version_becomes_champion(registry):
    reg = _register(registry, "m-first", 0.5, 200)
    d = _promote(registry, reg)
    assert (d["action"], d["champion_before"], d["champion_after"]) == ("promoted", None, 1)
    assert _state("m-first") == (1, None)
    from steps.core import tracking
    assert tracking.model_version("m-first", 1)["tags"]["promotion.decision"] == "promoted"


def test_better_version_promoted_and_previous_kept(registry):
    from steps.core import tracking

    _promote(registry, _register(registry, "m-better", 0.50, 200))
    reg2 = _register(registry, "m-better", 0.55, 150)
    d = _promote(registry, reg2)
    assert d["action"] == "promoted" and (d["champion_after"], d["previous_after"]) == (2, 1)
    assert {c["dataset"] for c in d["checks"]} == {"musique", "ecommerce"} and all(c["passed"] for c in d["checks"])
    assert _state("m-better") == (2, 1)
    v2 = tracking.model_version("m-better", 2)
    assert v2["tags"]["promotion.previous_version"] == "1" and "champion" in v2["aliases"]
    assert tracking.model_version("m-better", 1)["tags"]["promotion.superseded_by"] == "2"
    # running the stage again on the same registry.json changes nothing
    assert _promote(registry, reg2)["action"] == "unchanged" and _state("m-better") == (2, 1)


def test_worse_version_refused_with_reasons_in_tags(registry):
    from steps.core import tracking

    _promote(registry, _register(registry, "m-worse", 0.60, 150))
    d = _promote(registry, _register(registry, "m-worse", 0.55, 160))  # 5 points worse and longer
    assert d["action"] == "refused" and _state("m-worse") == (1, None)
    failed = {f"{c['dataset']}/{c['metric']}" for c in d["checks"] if not c["passed"]}
    assert failed == {"musique/correctness", "musique/tokens_per_response",
                      "ecommerce/correctness", "ecommerce/tokens_per_response"}
    tags = tracking.model_version("m-worse", 2)["tags"]
    assert tags["promotion.decision"] == "refused" and tags["promotion.compared_to"] == "1"
    assert "musique/correctness: 0.55 < champion 0.6" in tags["promotion.reasons"]
    # within tolerance (1 point lower, same length) passes
    assert _promote(registry, _register(registry, "m-worse", 0.595, 150))["action"] == "promoted"


def test_rollback(registry, capsys):
    from steps.core import tracking

    for i, c in enumerate((0.5, 0.6, 0.7)):
        _promote(registry, _register(registry, "m-roll", c, 100 - i))
    assert _state("m-roll") == (3, 2)
    args = ["rollback", "--params", str(registry / "params.yaml"), "--model-name", "m-roll"]
    main(args)
    assert _state("m-roll") == (2, 1)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["aliases"] == {"champion": 2, "previous": 1}
    assert tracking.model_version("m-roll", 3)["tags"]["promotion.decision"] == "rolled_back"
    main(args)
    assert _state("m-roll") == (1, None)
    with pytest.raises(InputError, match="no version holds 'previous'"):
        main(args)
    assert _state("m-roll") == (1, None)
