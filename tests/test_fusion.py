"""Mode fusion (steps/fusion.py): the teacher's no-think responses, judged, join the thinking
traces; each mode is trained under its own prompt."""
import pytest

from tests.helpers import TINY_DENSE, TINY_MOE, examples, tiny_model


def test_fused_rows_train_each_mode_under_its_own_prompt(tmp_path):
    from transformers import AutoTokenizer

    from steps.fusion import FusionConfig, fused_rows, sample_and_judge
    from steps.rft import train_sft

    rows = examples(2, 2)
    teacher = tiny_model(tmp_path / "teacher", TINY_DENSE, rows)
    student = tiny_model(tmp_path / "student", TINY_MOE, rows)
    cfg = FusionConfig(sample={"k": 2, "max_new_tokens": 6, "temperature": 1.0}, judge={"keep": "all"},
                       train={"max_steps": 2, "batch_size": 4})
    kept_no_think, stats = sample_and_judge(cfg, rows, str(teacher), tmp_path / "work")
    assert len(kept_no_think) == 2 * len(rows) and stats["filter"] == "all"
    kept_think = [{"id": r["id"], "completion": f"<think> {r['documents'][0]} </think> the answer is x ."}
                  for r in rows[:2]]
    tok = AutoTokenizer.from_pretrained(student)
    fused = fused_rows(rows, kept_think, kept_no_think, tok)
    assert len(fused) == 2 + len(kept_no_think)
    think, no_think = fused[:2], fused[2:]
    assert all(not r["prompt"].rstrip().endswith("</think>") and r["completion"].startswith("<think>") for r in think)
    # the no-think prompt pre-fills the empty block; the completion is the response alone
    assert all(r["prompt"].endswith("<think> </think> ") and "</think>" not in r["completion"] for r in no_think)
    assert [r["completion"] for r in no_think] == [k["response"] for k in kept_no_think]
    result = train_sft(cfg.train_config(), fused, str(student), tmp_path / "out", stage_name="fusion")
    assert result["metrics"]["train_rows"] == len(fused) and (tmp_path / "out" / "model").exists()


def test_the_stage_owns_the_template_switches():
    from steps.core.config import ConfigError
    from steps.fusion import FusionConfig

    assert FusionConfig().sample_config().chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(ConfigError, match="sample.chat_template_kwargs: set by the stage"):
        FusionConfig(sample={"chat_template_kwargs": {"enable_thinking": True}})
    with pytest.raises(ConfigError, match="train"):
        FusionConfig(train={"max_stepz": 3})
    assert FusionConfig(seed=3).train_config().seed == 3
