"""Tiny real models and rows for stage-core tests; DVC workspaces for whole-pipeline tests."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from steps.core import synth
from steps.ingest import parse_ecommerce, parse_musique

ROOT = Path(__file__).resolve().parents[1]

TINY_DENSE = {"type": "qwen3", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64}
TINY_MOE = {"type": "qwen3_moe", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 64, "moe_intermediate_size": 32,
            "num_experts": 4, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.05}


def examples(n_musique: int = 6, n_ecommerce: int = 4, seed: int = 0) -> list[dict]:
    m, _ = parse_musique(list(enumerate(synth.musique_rows(n_musique, seed), 1)), "synthetic")
    return m + parse_ecommerce(list(enumerate(synth.ecommerce_rows(n_ecommerce, seed), 1)), "synthetic")


def tiny_model(path: Path, arch: dict, rows: list[dict], seed: int = 0) -> Path:
    """Save a freshly initialised tiny model with a tokenizer over `rows` to `path`."""
    from steps.core import modeling
    from steps.pretrain_demo import corpus_texts

    tok = modeling.build_tokenizer(corpus_texts(rows))
    model = modeling.build_model(arch, len(tok), tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def byte_level_tokenizer(texts: list[str], vocab_size: int = 512):
    """A byte-level BPE tokenizer over `texts`, as real models have (any string is spellable and
    decodes exactly), with the pipeline's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from steps.core.modeling import CHAT_TEMPLATE, SPECIAL

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def overlay(params: dict, preset: dict) -> dict:
    """Each section of `preset` updates that section of `params` key by key."""
    for section, values in preset.items():
        params.setdefault(section, {}).update(values)
    return params


def pipeline_workspace(ws: Path, *presets: dict) -> dict[str, str]:
    """A git + DVC workspace in `ws` with the stages and params.yaml overlaid with `presets` in
    turn; returns the environment to run dvc in (MLflow tracking into the workspace)."""
    for item in ("steps", "flows", "dvc.yaml", ".dvcignore"):
        src = ROOT / item
        if src.is_dir():
            shutil.copytree(src, ws / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, ws / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for preset in presets:
        overlay(params, preset)
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PIPELINE_TRACKING": "on",
           "MLFLOW_TRACKING_URI": f"sqlite:///{ws}/mlflow.db", "PYTHONPATH": str(ws)}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=ws, check=True, env=env)
    return env


def dvc(ws: Path, env: dict[str, str], *args: str) -> tuple[str, float]:
    """Run dvc in `ws`; asserts success. Returns (stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=ws, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr, time.perf_counter() - t0


def check_pipeline_outputs(ws: Path) -> None:
    """Every output of a finished micro pipeline run exists and validates against its schema."""
    from steps.core.io import read_jsonl
    from steps.core.schemas import CANDIDATES, EXAMPLES, JUDGED, PREDICTIONS, validate

    d = ws / "data"
    for path, schema in ((d / "ingest/train.jsonl", EXAMPLES), (d / "ingest/eval.jsonl", EXAMPLES),
                         (d / "sample/candidates.jsonl", CANDIDATES), (d / "judge/judged.jsonl", JUDGED),
                         (d / "evaluate/predictions.jsonl", PREDICTIONS)):
        validate(read_jsonl(path), schema, path)
    for model in ("pretrain_demo/teacher", "pretrain_demo/student_base", "rft/model", "grpo/model"):
        assert (d / model / "model.safetensors").exists(), model
    for f in ("rft/model/meta.json", "grpo/model/meta.json", "grpo/ref_lengths.jsonl", "grpo/train_log.csv",
              "export/bundle/checksums.json", "export/bundle/README.md", "export/bundle/tokenizer.json"):
        assert (d / f).exists(), f
    summary = json.loads((ws / "reports/summary.json").read_text())
    assert set(summary["datasets"]) == {"musique", "ecommerce"}
    for ds, models in summary["datasets"].items():
        assert list(models) == ["teacher", "student_base", "rft", "rft_grpo"]
        for m in models.values():
            for key in ("correctness", "helpfulness", "tokens_per_response", "decode_tflops_per_response"):
                assert 0 <= m[key] <= (1 if key in ("correctness", "helpfulness") else float("inf"))
            assert (m["em"] is None) == (ds == "ecommerce") and m["n"] == 4
    assert (ws / "reports/plots/tokens_vs_correctness.png").stat().st_size > 1000
    stats = json.loads((d / "evaluate/stats.json").read_text())
    assert stats["prompts_over_budget"] == {m: 0 for m in ("teacher", "student_base", "rft", "rft_grpo")}
    assert json.loads((d / "sample/stats.json").read_text())["prompts_over_budget"] == 0
