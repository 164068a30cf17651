"""Tiny real models and rows for stage-core tests."""
from __future__ import annotations

from pathlib import Path

from steps.core import synth
from steps.ingest import parse_ecommerce, parse_musique

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


def overlay(params: dict, preset: dict) -> dict:
    """params.yaml with a preset's sections merged in (tests/micro.yaml)."""
    for section, values in preset.items():
        params.setdefault(section, {}).update(values)
    return params
