"""How an example becomes a prompt, and how a completion splits into thinking and response.

One format for every model: the chat messages are (dialogue history..., user turn holding the
documents D_t and the question Q_t); the tokenizer's own chat template renders them (our tiny
models ship a template too), so a real model and the embedded one take the same path.
A completion is `<think> T </think> R`; models that put the trace in a separate
`reasoning_content` field are handled by the back end that receives it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

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


def build(example: dict[str, Any], tokenizer: Any, chat_template_kwargs: dict[str, Any] | None = None) -> Prompt:
    """The prompt a back end needs: rendered text when it tokenises locally (`tokenizer` given),
    chat messages always. The template switches travel in `meta` too, because a server applies
    its own chat template (the OpenAI back end forwards them) and would otherwise silently drop
    `enable_thinking`."""
    meta = {"chat_template_kwargs": dict(chat_template_kwargs or {})}
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
