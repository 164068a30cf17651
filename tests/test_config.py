from dataclasses import dataclass

import pytest

from steps.core.config import ConfigError, help_field, load_config
from steps.grpo import GrpoConfig
from steps.ingest import IngestConfig


@dataclass(frozen=True)
class Demo:
    n: int = help_field(1, "a count")
    rate: float = help_field(0.5, "a rate")
    names: tuple[str, ...] = help_field(("a",), "names")
    path: str | None = help_field(None, "optional")
    seed: int = help_field(0, "from base")


def test_unknown_key_names_key_file_and_section(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("demo:\n  n: 2\n  nn: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(Demo, "demo", p)
    assert "nn" in str(e.value) and str(p) in str(e.value) and "'demo'" in str(e.value)


def test_types_are_checked_and_lists_become_tuples(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("base: {seed: 7}\ndemo:\n  n: 2\n  rate: 1\n  names: [x, y]\n")
    cfg = load_config(Demo, "demo", p)
    assert cfg == Demo(n=2, rate=1.0, names=("x", "y"), path=None, seed=7)
    p.write_text("demo:\n  n: two\n")
    with pytest.raises(ConfigError, match=r"demo'\.n: expected int, got str 'two'"):
        load_config(Demo, "demo", p)


def test_a_null_base_key_follows_base_and_a_set_one_wins(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("base: {seed: 7}\ndemo: {seed: null}\n")
    assert load_config(Demo, "demo", p).seed == 7
    p.write_text("base: {seed: 7}\ndemo: {seed: 1}\n")
    assert load_config(Demo, "demo", p).seed == 1


def test_missing_section_and_missing_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("other: {}\n")
    with pytest.raises(ConfigError, match="missing section 'demo'"):
        load_config(Demo, "demo", p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(Demo, "demo", tmp_path / "nope.yaml")


def test_post_init_errors_say_what_to_do(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("ingest:\n  sources: [musique]\n")
    with pytest.raises(ConfigError, match="source musique needs musique_path"):
        load_config(IngestConfig, "ingest", p)
    p.write_text("grpo:\n  rewards: {speed: {weight: 1}}\n")
    with pytest.raises(ConfigError, match=r"\['speed'\] are not registered"):
        load_config(GrpoConfig, "grpo", p)
    p.write_text("grpo:\n  num_generations: 1\n")
    with pytest.raises(ConfigError, match="num_generations must be >= 2"):
        load_config(GrpoConfig, "grpo", p)


def test_repository_params_load_for_every_stage():
    from steps import evaluate, export, judge, pretrain_demo, rft, sample
    for cls, name in [(IngestConfig, "ingest"), (pretrain_demo.PretrainDemoConfig, "pretrain_demo"),
                      (sample.SampleConfig, "sample"), (judge.JudgeConfig, "judge"), (rft.RftConfig, "rft"),
                      (GrpoConfig, "grpo"), (evaluate.EvaluateConfig, "evaluate"), (export.ExportConfig, "export")]:
        load_config(cls, name, "params.yaml")
