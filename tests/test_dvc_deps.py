"""dvc.yaml's code deps are complete: every steps.* module a stage runs is a dep of that stage, so
editing it makes `dvc status` report the stage changed (a trained model never goes stale unseen)."""
from steps.core.deps import closure, missing_deps
from tests.helpers import ROOT


def test_every_stage_lists_every_module_it_runs():
    assert missing_deps(ROOT / "dvc.yaml") == {}


def test_the_closure_follows_lazy_imports_registries_and_discovered_packages():
    files = {str(f.relative_to(ROOT)) for f in closure("steps.grpo")}
    assert "steps/core/training.py" in files           # imported inside a function
    assert "steps/core/backend_openai.py" in files      # named in a "module:Class" registry string
    assert "steps/core/rewards/dler.py" in files        # discovered by the rewards package at import
    assert "steps/core/rollouts/plain.py" in files


def test_a_missing_dep_is_reported(tmp_path):
    text = (ROOT / "dvc.yaml").read_text().replace(" steps/core/rl.py,", "", 1)
    (tmp_path / "dvc.yaml").write_text(text)
    gaps = missing_deps(tmp_path / "dvc.yaml")
    assert gaps == {"grpo": ["steps/core/rl.py"]}
