"""New words in a model's vocabulary: the routing and command tags that the relay and router
stages add when the tokenizer cannot spell them."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def init_added_rows(weight: Any, n_added: int, seed: int) -> None:
    """Give the last `n_added` rows of an embedding (or output) matrix distinct values: each a draw
    from N(mean, covariance) of the older rows, in place.

    transformers' `resize_token_embeddings` draws them from N(mean, 1e-9 x covariance): every new
    row is the mean, to one part in ~1e5. That keeps a big model's first outputs unchanged, but
    the new tokens start indistinguishable from one another (and close to whatever token sits
    near the mean, [UNK] in the embedded vocabulary); with tied embeddings a short SFT moved them
    too little to tell `<answer>` from `<search>` (cosine 0.83-0.96 after the router stage's
    60-step warm-up, and the policy wrote [UNK] where a tag belonged). A full-covariance draw
    gives them the spread of real tokens, so the warm-up only has to place them."""
    import torch

    if n_added <= 0:
        return
    with torch.no_grad():
        old = weight[:-n_added].detach().to(torch.float32)
        mean = old.mean(dim=0)
        centred = old - mean
        cov = centred.T @ centred / old.shape[0]
        cov += 1e-6 * torch.eye(cov.shape[0])  # positive definite even for a degenerate matrix
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(n_added, old.shape[1], generator=gen) @ torch.linalg.cholesky(cov).T
        weight[-n_added:] = (mean + noise).to(weight.dtype)


def add_vocabulary(model_dir: str, out: Path, words: list[str], seed: int) -> str:
    """`model_dir` with `words` added to its tokenizer as ordinary (not special) tokens, the
    embeddings resized and the new rows initialised by `init_added_rows`, saved under `out` by the
    main process of a launched run (every process waits for it); returns `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steps.core import launch

    tok = AutoTokenizer.from_pretrained(model_dir)
    added = tok.add_tokens(list(words))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tok))
    init_added_rows(model.get_input_embeddings().weight, added, seed)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not model.get_input_embeddings().weight:
        init_added_rows(head.weight, added, seed + 1)
    if launch.is_main():
        model.save_pretrained(out)
        tok.save_pretrained(out)
    launch.wait_for_everyone()
    return str(out)
