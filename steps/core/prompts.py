"""How an example becomes a prompt, and how a completion splits into thinking and response.

One format for every model: the chat messages are (dialogue history..., user turn holding the
documents D_t and the question Q_t); the tokenizer's own chat template renders them (our tiny
models ship a template too), so a real model and the embedded one take the same path.
A completion is `<think> T </think> R`; models that put the trace in a separate
`reasoning_content` field are handled by the back end that receives it.

Context budget: `build(..., max_prompt_tokens=N)` drops whole documents, least relevant first
(fewest content words shared with the question and the history; the later one among equals),
until the prompt fits; the question and the history are never cut. How many were dropped is in
`Prompt.meta["dropped_documents"]`, so stages count and report the examples that lost context.
"""
from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from steps.core.metrics import content_tokens

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
INSTRUCTION = "reply with : the answer is X ."


@dataclass(frozen=True)
class Prompt:
    """A prompt in both forms a back end may need: chat messages and the rendered text."""
    messages: tuple[dict[str, str], ...]
    text: str
    key: str = ""  # stable identity (example id) for caching and logs
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


def user_turn(example: dict[str, Any]) -> str:
    docs = " ".join(f"[{i + 1}] {d}" for i, d in enumerate(example["documents"]))
    return f"documents : {docs} question : {example['question']} {INSTRUCTION}"


def messages(example: dict[str, Any]) -> list[dict[str, str]]:
    return [*({"role": t["role"], "content": t["content"]} for t in example["history"]),
            {"role": "user", "content": user_turn(example)}]


def render(example: dict[str, Any], tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> Prompt:
    msgs = messages(example)
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                         **(chat_template_kwargs or {}))
    return Prompt(messages=tuple(msgs), text=text, key=example["id"])


class PromptBudgetError(ValueError):
    """The question and the history alone exceed the prompt budget."""


def relevance_order(example: dict[str, Any]) -> list[int]:
    """Document indices, least relevant first: fewest content words shared with the question
    and the history, and the later document first among equals. Labels (gold documents) are
    never consulted: a prompt must not depend on the answer."""
    query = set(content_tokens(" ".join([example["question"], *(t["content"] for t in example["history"])])))
    overlap = [len(query.intersection(content_tokens(d))) for d in example["documents"]]
    return sorted(range(len(overlap)), key=lambda i: (overlap[i], -i))


def drop_documents(example: dict[str, Any], n: int) -> dict[str, Any]:
    """The example without its `n` least relevant documents; the others keep their order."""
    gone = set(relevance_order(example)[:n])
    return {**example, "documents": [d for i, d in enumerate(example["documents"]) if i not in gone]}


def fit_documents(example: dict[str, Any], size: Callable[[dict[str, Any]], int], max_tokens: int) -> int:
    """The fewest documents to drop (drop_documents) for `size` of the example to be at most
    `max_tokens`. Raises PromptBudgetError when dropping them all is not enough."""
    if size(example) <= max_tokens:
        return 0
    # Dropping documents only shortens the prompt, so the fewest drops that fit can be bisected.
    n_docs = len(example["documents"])
    n = bisect.bisect_left(range(n_docs + 1), True, lo=1, key=lambda k: size(drop_documents(example, k)) <= max_tokens)
    if n > n_docs:
        raise PromptBudgetError(f"example {example['id']!r}: the question and history alone take "
                                f"{size(drop_documents(example, n_docs))} tokens, more than "
                                f"max_prompt_tokens={max_tokens}")
    return n


def prompt_size(tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> Callable[[dict[str, Any]], int]:
    """Tokens of the rendered prompt; without a local tokenizer (a server applies its own
    template), whitespace-separated words of the messages, an estimate."""
    if tokenizer is None:
        return lambda e: sum(len(m["content"].split()) for m in messages(e))
    return lambda e: len(tokenizer(render(e, tokenizer, chat_template_kwargs).text,
                                   add_special_tokens=False)["input_ids"])


def build(example: dict[str, Any], tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None,
          max_prompt_tokens: int | None = None) -> Prompt:
    """The prompt a back end needs: rendered text when it tokenises locally (`tokenizer` given),
    chat messages always. The template switches travel in `meta` too, because a server applies
    its own chat template (the OpenAI back end forwards them) and would otherwise silently drop
    `enable_thinking`. With `max_prompt_tokens`, documents are dropped until the prompt fits
    (module docstring); `meta["dropped_documents"]` says how many."""
    dropped = 0
    if max_prompt_tokens is not None:
        dropped = fit_documents(example, prompt_size(tokenizer, chat_template_kwargs), max_prompt_tokens)
        example = drop_documents(example, dropped) if dropped else example
    meta = {"chat_template_kwargs": dict(chat_template_kwargs or {}), "dropped_documents": dropped}
    if tokenizer is None:
        return Prompt(messages=tuple(messages(example)), text="", key=example["id"], meta=meta)
    rendered = render(example, tokenizer, chat_template_kwargs)
    return Prompt(messages=rendered.messages, text=rendered.text, key=rendered.key, meta=meta)


_WS = re.compile(r"\s+")


def split_completion(completion: str) -> tuple[str, str]:
    """(thinking, response). Without a closing `</think>` the whole text is thinking that ran
    out of budget and the response is empty; without any think tags it is all response."""
    text = completion.strip()
    if THINK_CLOSE in text:
        thinking, response = text.split(THINK_CLOSE, 1)
        thinking = thinking.replace(THINK_OPEN, "", 1)
        return _WS.sub(" ", thinking).strip(), _WS.sub(" ", response).strip()
    if text.startswith(THINK_OPEN):
        return _WS.sub(" ", text[len(THINK_OPEN):]).strip(), ""
    return "", _WS.sub(" ", text).strip()


def join_completion(thinking: str, response: str) -> str:
    return f"{THINK_OPEN} {thinking} {THINK_CLOSE} {response}"
