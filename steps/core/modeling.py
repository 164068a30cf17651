"""Tiny models for the embedded default, and the FLOPs convention used in every report.

FLOPs convention (decode, per generated token at context length c):
    2 * N_active + 2 * n_layer * c * d_attn
N_active counts the parameters a token multiplies through: every non-embedding weight,
only top-k of the E experts in MoE layers, plus the output projection (d_model x vocab);
the input embedding is a lookup and is excluded. d_attn = n_heads * head_dim.
Prefill is reported apart as the same sum over the prompt's positions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Thinking on/off follows Qwen3's switches. `enable_thinking=False` pre-fills an empty think
# block after the assistant tag, as Qwen3's template does with "<think>\n\n</think>\n\n"; the
# word-level tokenizer splits on whitespace, so the closest faithful form is "<think> </think> "
# (the same two tokens, then the response). Without that kwarg (or with it true), a "/no_think"
# in the last user turn does the same and "/think" does not, the later of the two winning;
# enable_thinking=False overrides both, as in Qwen3. (In Qwen3 the model itself honours the soft
# switches, trained to; a tiny model is not, so its template turns them into the pre-fill.)
# Without the kwarg and without a switch the rendering is exactly the original one.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant> "
    "{% set ns = namespace(last='') %}"
    "{% for m in messages if m['role'] == 'user' %}"
    "{% set ns.last = m['content'] if m['content'] is string else '' %}{% endfor %}"
    "{% if (enable_thinking is defined and enable_thinking is false)"
    " or ns.last.rfind('/no_think') > ns.last.rfind('/think') %}<think> </think> {% endif %}"
    "{% endif %}"
)
SPECIAL = {"pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "[EOS]"}
# <think> markers are ordinary words: TRL strips special tokens from completions before
# rewards see them, and the format rewards must see the markers.
WORD_PATTERN = r"</?[a-z]+>|\w+|[^\w\s]"


def build_tokenizer(texts: list[str], min_frequency: int = 1) -> Any:
    """A word-level tokenizer over `texts` (lower-cased; punctuation split off), with a chat
    template, wrapped as a transformers fast tokenizer."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated"),
    ])
    trainer = WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=min_frequency)
    base_words = ["<think>", "</think>", "<user>", "<assistant>", "<system>"]
    tok.train_from_iterator([*base_words, *texts], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def build_model(arch: dict[str, Any], vocab_size: int, tokenizer: Any, seed: int) -> Any:
    """A freshly initialised causal LM: `arch["type"]` is `qwen3` (dense) or `qwen3_moe`."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    arch = dict(arch)
    kind = arch.pop("type")
    common = dict(vocab_size=vocab_size, tie_word_embeddings=True, max_position_embeddings=1024,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=None, rope_theta=10000.0, attention_dropout=0.0)
    if kind == "qwen3":
        config = Qwen3Config(**common, **arch)
    elif kind == "qwen3_moe":
        # output_router_logits makes the model add router_aux_loss_coef * L_aux to its loss:
        # the paper's L_total = L_SFT + lambda_aux * L_aux.
        config = Qwen3MoeConfig(**common, output_router_logits=True, decoder_sparse_step=1,
                                mlp_only_layers=[], **arch)
    else:
        raise ValueError(f"unknown model type {kind!r}: expected qwen3 or qwen3_moe")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    return model


def active_params(model: Any) -> int:
    """N_active of the FLOPs convention (see the module docstring)."""
    cfg = model.config
    n_experts = getattr(cfg, "num_experts", None) or 0
    top_k = getattr(cfg, "num_experts_per_tok", None) or 0
    embed = model.get_input_embeddings().weight
    total = 0
    for name, p in model.named_parameters():
        if p is embed:
            continue
        if n_experts and ".experts." in name + ".":
            total += p.numel() * top_k // n_experts
        else:
            total += p.numel()
    if getattr(cfg, "tie_word_embeddings", False):
        total += embed.numel()  # the output projection reuses the embedding matrix
    return int(total)


def flops_profile(model: Any) -> dict[str, int]:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {"n_active": active_params(model), "n_layer": int(cfg.num_hidden_layers),
            "d_attn": int(cfg.num_attention_heads * head_dim),
            "n_params": int(sum(p.numel() for p in model.parameters()))}


def decode_flops(profile: dict[str, int], prompt_tokens: int, generated_tokens: int) -> float:
    """Sum over generated tokens i of 2*N + 2*L*c_i*d, with c_i = prompt_tokens + i + 1."""
    n, L, d, g, p = profile["n_active"], profile["n_layer"], profile["d_attn"], generated_tokens, prompt_tokens
    context_sum = g * p + g * (g + 1) / 2
    return 2.0 * n * g + 2.0 * L * d * context_sum


def prefill_flops(profile: dict[str, int], prompt_tokens: int) -> float:
    n, L, d, p = profile["n_active"], profile["n_layer"], profile["d_attn"], prompt_tokens
    return 2.0 * n * p + 2.0 * L * d * p * (p + 1) / 2


def save_profile(model: Any, directory: Path | str) -> dict[str, int]:
    from steps.core.io import write_json

    prof = flops_profile(model)
    write_json(Path(directory) / "flops_profile.json", prof)  # atomic, and once in a launched run
    return prof


def load_profile(directory: Path | str) -> dict[str, int]:
    """The FLOPs profile saved beside a model; computed from the config on meta weights if absent."""
    path = Path(directory) / "flops_profile.json"
    if path.exists():
        return json.loads(path.read_text())
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return flops_profile(model)
