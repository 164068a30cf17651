import os
from dataclasses import dataclass
from pathlib import Path

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
    with pytest.raises(ConfigError, match=r"section 'grpo': rewards.speed: reward 'speed' is not registered"):
        load_config(GrpoConfig, "grpo", p)
    p.write_text("grpo:\n  num_generations: 1\n")
    with pytest.raises(ConfigError, match=r"section 'grpo'.num_generations: must be >= 2, got 1"):
        load_config(GrpoConfig, "grpo", p)


def test_repository_params_load_for_every_stage():
    """Every stage of dvc.yaml is `python -m steps.<stage>` with a `<Name>Config` in that module
    read from the params section of the stage's name; all of them load from the repository's
    params.yaml (derived from dvc.yaml: a new method's stage is checked without editing this test)."""
    import dataclasses
    import importlib

    import yaml

    from steps import export
    from steps.core.registry import load_registry

    stages = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]
    checked = []
    for name, stage in stages.items():
        module = importlib.import_module(f"steps.{name}")
        cmd = " ".join((stage.get("do") or stage)["cmd"].split())
        assert f"python -m steps.{name} " in cmd, (name, cmd)
        configs = [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)
                   and c.__module__ == module.__name__ and c.__name__.endswith("Config")]
        assert len(configs) == 1, (name, configs)
        load_config(configs[0], name, "params.yaml")
        checked.append(name)
    assert {"ingest", "sample", "rft", "grpo", "evaluate", "router", "promote"} <= set(checked)
    rows = load_registry("params.yaml")
    assert load_config(export.ExportConfig, "export", "params.yaml").source in rows


# --- issue 11: every config error names file, section and key --------------------------------

def _load(tmp_path, text, cls, section):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(cls, section, p)
    return str(e.value), str(p)


@pytest.mark.parametrize("text,section,key,expected", [
    ("rft: {max_steps: -5}", "rft", "max_steps", "must be >= -1, got -5"),
    ("sample: {temperature: -1}", "sample", "temperature", "must be >= 0.0, got -1.0"),
    ("sample: {top_p: 0}", "sample", "top_p", "must be > 0.0"),
    ("sample: {k: 0}", "sample", "k", "must be >= 1, got 0"),
    ("ingest: {eval_fraction: 1.5}", "ingest", "eval_fraction", "must be < 1.0"),
    ("pretrain_demo: {teacher_steps: 0}", "pretrain_demo", "teacher_steps", "must be >= 1"),
    ("judge: {max_kept_per_example: 0}", "judge", "max_kept_per_example", "must be >= 1"),
    ("rft: {learning_rate: .nan}", "rft", "learning_rate", "finite"),
])
def test_numbers_out_of_range_name_file_section_and_key(tmp_path, text, section, key, expected):
    from steps import judge, pretrain_demo, rft, sample
    cls = {"rft": rft.RftConfig, "sample": sample.SampleConfig, "ingest": IngestConfig, "judge": judge.JudgeConfig,
           "pretrain_demo": pretrain_demo.PretrainDemoConfig}[section]
    msg, path = _load(tmp_path, f"base: {{seed: 0}}\n{text}\n", cls, section)
    assert msg.startswith(f"{path}: section '{section}'.{key}: ") and expected in msg, msg


@pytest.mark.parametrize("text,where,expected", [
    ("sample: {backend: transformer}", "section 'sample': backend: ", "unknown generation back end 'transformer'"),
    ("sample: {backend_options: {batch_sise: 8}}", "section 'sample': backend_options.batch_sise: ",
     "unknown option; allowed options are ['batch_size', "),
    ("sample: {backend: openai, backend_options: {concurrency: many}}",
     "section 'sample': backend_options.concurrency: ", "expected int, got str 'many'"),
    ("sample: {backend: openai, backend_options: {model: x}}", "section 'sample': backend_options.model: ",
     "set by the stage itself"),
    ("sample: {backend_options: [1, 2]}", "section 'sample'.backend_options: ", "expected a mapping"),
    ("judge: {kind: llm, options: {model: m, modle: x}}", "section 'judge': options.modle: ", "unknown option"),
    ("judge: {kind: llm, options: {model: m, concurrency: 2.5}}", "section 'judge': options.concurrency: ",
     "expected int"),
    ("judge: {kind: llm, options: {base_url: http://x}}", "section 'judge': options: ",
     "missing required option(s) ['model']"),
    ("judge: {kind: rules}", "section 'judge': kind: ", "unknown judge 'rules'"),
])
def test_back_end_and_judge_options_are_checked_at_load(tmp_path, text, where, expected):
    from steps import judge, sample
    section = text.split(":")[0]
    cls = {"sample": sample.SampleConfig, "judge": judge.JudgeConfig}[section]
    msg, path = _load(tmp_path, f"base: {{seed: 0}}\n{text}\n", cls, section)
    assert msg.startswith(f"{path}: {where}") and expected in msg, msg


def test_llm_judge_options_forwarded_to_the_openai_back_end_are_accepted(tmp_path):
    from steps.judge import JudgeConfig
    p = tmp_path / "params.yaml"
    p.write_text("judge: {kind: llm, options: {model: m, tokenizer: null, backoff_max_s: 2, api_key_env: JUDGE_KEY}}\n")
    assert load_config(JudgeConfig, "judge", p).options["api_key_env"] == "JUDGE_KEY"


def test_check_options_against_a_signature():
    from steps.core.config import check_options

    def reward(completions, weight: float = 1.0, lambda_lower: float = 0.2, mode: str | None = None) -> list:
        return []

    check_options(reward, {"weight": 2, "lambda_lower": 0.1, "mode": None}, "grpo.rewards.length",
                  reserved=("completions",))
    with pytest.raises(ConfigError, match=r"^grpo\.rewards\.length\.lamda_lower: unknown option; allowed options "
                                          r"are \['lambda_lower', 'mode', 'weight'\]"):
        check_options(reward, {"lamda_lower": 0.9}, "grpo.rewards.length", reserved=("completions",))
    with pytest.raises(ConfigError, match=r"^grpo\.rewards\.correctness\.weight: expected float, got str 'two'"):
        check_options(reward, {"weight": "two"}, "grpo.rewards.correctness", reserved=("completions",))
    with pytest.raises(ConfigError, match=r"^r: missing required option\(s\) \['completions'\]"):
        check_options(reward, {}, "r")

    def passthrough(model: str, batch_size: int = 1, **engine: object) -> None: ...

    check_options(passthrough, {"batch_size": 2, "enforce_eager": True}, "x", reserved=("model",))


def test_yaml_syntax_error_is_one_line_naming_file_line_and_column(tmp_path):
    import subprocess
    import sys

    p = tmp_path / "params.yaml"
    p.write_text("base: {seed: 0}\njudge:\n  kind: rule\n  keep: [all\n")
    with pytest.raises(ConfigError) as e:
        load_config(Demo, "demo", p)
    assert str(e.value).startswith(f"{p}: line 5, column 1: invalid YAML") and "\n" not in str(e.value), str(e.value)
    # A stage stopped by it prints that one line, not a parser traceback.
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "steps.judge", "--params", str(p)], cwd=tmp_path, text=True,
                          capture_output=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [f"error: {e.value}"], proc.stderr


def test_a_key_given_twice_is_refused(tmp_path):
    msg, path = _load(tmp_path, "base: {seed: 0}\ndemo:\n  n: 1\n  n: 2\n", Demo, "demo")
    assert msg.startswith(f"{path}: line 4, column 3: invalid YAML") and "'n' appears twice" in msg, msg


def test_one_seed_rule_for_every_stage(tmp_path):
    """Without base.seed every stage stops with the same message (none falls back to 0 alone);
    a stage's own non-null seed needs no base."""
    from steps import pretrain_demo, rft, sample
    for cls, name, body in [(IngestConfig, "ingest", ""), (rft.RftConfig, "rft", ""), (GrpoConfig, "grpo", ""),
                            (sample.SampleConfig, "sample", ""),
                            (pretrain_demo.PretrainDemoConfig, "pretrain_demo", "teacher_path: t, student_path: s")]:
        for text in (f"{name}: {{{body}}}\n", f"base: {{}}\n{name}: {{{body}}}\n",
                     f"base: null\n{name}: {{seed: null, {body}}}\n"):
            msg, path = _load(tmp_path, text, cls, name)
            assert msg == (f"{path}: section 'base': missing key 'seed'; every stage takes its seed from base.seed "
                           "(unless its own section sets one): add `base: {seed: 0}`"), (name, msg)
    p = tmp_path / "params.yaml"
    p.write_text("rft: {seed: 3}\n")
    assert load_config(rft.RftConfig, "rft", p).seed == 3
    msg, path = _load(tmp_path, "base: {seed: -1}\nrft: {}\n", rft.RftConfig, "rft")
    assert msg.startswith(f"{path}: section 'base'.seed: expected an integer >= 0"), msg
    # Stages without a seed (judge, export, promote) do not need base at all.
    from steps.judge import JudgeConfig
    p.write_text("judge: {}\n")
    assert load_config(JudgeConfig, "judge", p).kind == "rule"


@pytest.mark.parametrize("text,key", [
    ("sample: {backend: openai, backend_options: {api_key: sk-abcdefghijklmnopqrstuvwx}}",
     "sample.backend_options.api_key"),
    ("judge: {kind: llm, options: {model: m, token: hunter2}}", "judge.options.token"),
    ("runner: {kind: docker, env: {AWS_SECRET_ACCESS_KEY: abc}}", "runner.env.AWS_SECRET_ACCESS_KEY"),
    ("sample: {backend_options: {extra_body: {note: 'Bearer abcdefghijklmnop'}}}",
     "sample.backend_options.extra_body.note"),
    ("sample: {backend_options: {base_url: 'http://user:pw@host:8000/v1'}}", "sample.backend_options.base_url"),
])
def test_a_literal_secret_in_params_is_refused_with_the_way_to_do_it(tmp_path, text, key):
    from steps.sample import SampleConfig
    msg, path = _load(tmp_path, f"base: {{seed: 0}}\n{text}\n", SampleConfig, "sample")
    assert msg.startswith(f"{path}: {key}: a literal secret in params is refused") and "_env: " in msg, msg
    assert "sk-abc" not in msg and "hunter2" not in msg  # the error itself does not repeat the secret


def test_api_key_env_names_the_variable_and_ordinary_token_keys_pass(tmp_path):
    from steps.sample import SampleConfig
    p = tmp_path / "params.yaml"
    p.write_text("base: {seed: 0}\nsample: {backend: openai, max_new_tokens: 8, "
                 "backend_options: {api_key_env: MY_KEY, tokenizer: null}}\n"
                 "promote: {gates: {tokens_per_response: {better: lower, tolerance: 0.0}}}\n")
    assert load_config(SampleConfig, "sample", p).backend_options == {"api_key_env": "MY_KEY", "tokenizer": None}
