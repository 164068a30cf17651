"""LLM judge: Correctness C and Helpfulness H from a model behind an OpenAI-compatible endpoint.

    judge = LLMJudge(model="Qwen/Qwen3-32B", base_url="http://gpu-1:8000/v1", votes=3,
                     temperature=0.7, cache_dir="data/.cache/judge")
    verdicts = judge.judge(examples, responses)   # Verdict(correct, helpful, rationale)

The prompt states LiveThinking's definitions word for word (C: every claim verifiable in D_t,
consistent with H_t, directly answers Q_t; H: beyond answering, anticipates the user's likely
need with relevant supplementary information grounded in the context) and shows the
documents, the dialogue history, the question and the response, never the thinking trace.
The verdict is JSON `{"rationale", "correct", "helpful"}`: with `guided` the server enforces
the schema (vLLM / SGLang guided decoding via `response_format: json_schema`); the rationale
comes first in it so the model states its evidence before it decides. Without `guided` the
first JSON object in the reply is parsed tolerantly (code fences, prose, a `<think>` block
around it) and an unparseable reply is asked again with a fresh seed, up to
`max_parse_attempts`. `votes` > 1 takes a per-criterion majority (a tie counts 0: keeping a
candidate needs positive evidence). Requests, retries, the cache and several servers
(`base_url: [url, url]`, with fail-over) are the OpenAI back end's.
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from steps.core.backend_openai import OpenAIBackend, Request
from steps.core.backends import derive_seed
from steps.core.judges import Verdict

log = logging.getLogger(__name__)

SYSTEM_PROMPT = """\
You are a strict evaluator. An assistant was given documents D (product documents or reference \
passages), a dialogue history H and the user's question Q, and wrote the response R. Judge R \
on two binary criteria, exactly as defined here:

correct = 1 if and only if all three hold:
  (a) every claim in R is verifiable in the documents D;
  (b) R is consistent with the dialogue history H;
  (c) R directly answers the question Q.
Otherwise correct = 0. A claim that is plausible but not stated in D makes correct = 0.

helpful = 1 if and only if, beyond answering Q, R anticipates the user's likely need and adds \
relevant supplementary information grounded in the context (D and H). Otherwise helpful = 0: \
a response that only answers Q, or whose additions are irrelevant to the user's need or not \
grounded in D or H, is not helpful.

Reply with one JSON object and nothing else:
{"rationale": "<one or two sentences naming the decisive evidence>", "correct": 0 or 1, "helpful": 0 or 1}"""

# Property order matters under guided decoding: the rationale is generated before the labels.
# The length cap bounds what a verdict costs, and makes any model, however poor, close the
# string and reach the labels within max_new_tokens.
RATIONALE_MAX_CHARS = 500
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"rationale": {"type": "string", "maxLength": RATIONALE_MAX_CHARS},
                   "correct": {"type": "integer", "enum": [0, 1]},
                   "helpful": {"type": "integer", "enum": [0, 1]}},
    "required": ["rationale", "correct", "helpful"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA, "strict": True}}

_BINARY = {0: 0, 1: 1, "0": 0, "1": 1, "true": 1, "false": 0, "yes": 1, "no": 0}


class VerdictParseError(ValueError):
    """The judge's reply holds no usable verdict; the message says what was wrong."""


@dataclass(frozen=True)
class Ballot:
    correct: int
    helpful: int
    rationale: str


def user_prompt(example: dict[str, Any], response: str) -> str:
    docs = "\n".join(f"[{i + 1}] {d}" for i, d in enumerate(example["documents"]))
    history = "\n".join(f"{t['role']}: {t['content']}" for t in example["history"]) or "(none)"
    return (f"## Documents\n{docs}\n\n## Dialogue history\n{history}\n\n## Question\n{example['question']}\n\n"
            f"## Response to judge\n{response}\n\n## Your verdict\nReturn the JSON object now.")


def _binary(obj: dict[str, Any], name: str) -> int:
    if name not in obj:
        raise VerdictParseError(f"verdict lacks field {name!r}: {json.dumps(obj)[:200]}")
    value = obj[name]
    key = value.strip().lower() if isinstance(value, str) else int(value) if isinstance(value, bool) else value
    if not isinstance(key, (int, str)) or key not in _BINARY:
        raise VerdictParseError(f"field {name!r} must be 0 or 1, got {value!r}")
    return _BINARY[key]


def parse_verdict(text: str) -> Ballot:
    """The first JSON object in `text` that carries both labels; a reasoning block before a
    `</think>` is skipped, since its drafts may hold objects that are not the verdict."""
    body = text.rsplit("</think>", 1)[-1]
    # strict=False: a raw newline or tab inside the rationale is common in model output, and
    # guided decoding lets control characters through in length-capped strings (xgrammar 0.2).
    decoder = json.JSONDecoder(strict=False)
    errors = []
    for m in re.finditer(r"\{", body):
        try:
            obj, _ = decoder.raw_decode(body, m.start())
        except json.JSONDecodeError as e:
            errors.append(e.msg)
            continue
        if isinstance(obj, dict) and ("correct" in obj or "helpful" in obj):
            rationale = obj.get("rationale", "")
            return Ballot(_binary(obj, "correct"), _binary(obj, "helpful"),
                          rationale if isinstance(rationale, str) else json.dumps(rationale))
    why = f" ({errors[0]})" if errors else ""
    raise VerdictParseError(f"no JSON verdict object in reply{why}: {text[:160]!r}")


def majority(ballots: Sequence[Ballot]) -> Verdict:
    """Per-criterion strict majority; the rationale of a ballot that agrees on both."""
    if len(ballots) == 1:
        b = ballots[0]
        return Verdict(b.correct, b.helpful, b.rationale)
    n = len(ballots)
    c, h = sum(b.correct for b in ballots), sum(b.helpful for b in ballots)
    correct, helpful = int(2 * c > n), int(2 * h > n)
    chosen = next((b for b in ballots if (b.correct, b.helpful) == (correct, helpful)), ballots[0])
    return Verdict(correct, helpful, f"votes correct {c}/{n}, helpful {h}/{n}; {chosen.rationale}")


class LLMJudge:
    name = "llm"

    # Options this class does not name go to the OpenAI back end; config checks follow them there.
    forwards_options_to = OpenAIBackend

    def __init__(self, model: str, base_url: str | list[str] = "http://127.0.0.1:8000/v1",
                 api_key_env: str | None = "OPENAI_API_KEY",
                 concurrency: int = 16, votes: int = 1, guided: bool = True, cache_dir: str | None = None,
                 temperature: float = 0.0, max_new_tokens: int = 1024, max_parse_attempts: int = 3,
                 retry_temperature: float = 0.7, max_unparseable_fraction: float = 0.05, seed: int = 0,
                 request_timeout_s: float = 300.0, max_retries: int = 8, requests_per_second: float | None = None,
                 chat_template_kwargs: dict[str, Any] | None = None, extra_body: dict[str, Any] | None = None,
                 progress: bool = True, **backend_options: Any):
        if votes < 1:
            raise ValueError(f"votes must be >= 1, got {votes}")
        if votes > 1 and temperature == 0:
            raise ValueError("votes > 1 needs temperature > 0 (greedy votes are copies of one another); "
                             "set temperature (e.g. 0.7) or votes: 1")
        if max_parse_attempts < 1:
            raise ValueError(f"max_parse_attempts must be >= 1, got {max_parse_attempts}")
        if not 0.0 <= max_unparseable_fraction <= 1.0:
            raise ValueError(f"max_unparseable_fraction must be in [0, 1], got {max_unparseable_fraction}")
        self.model, self.votes, self.guided = model, votes, guided
        self.temperature, self.retry_temperature = temperature, retry_temperature
        self.max_new_tokens, self.max_parse_attempts, self.seed = max_new_tokens, max_parse_attempts, seed
        self.max_unparseable_fraction = max_unparseable_fraction
        self.backend = OpenAIBackend(model=model, base_url=base_url, api_key_env=api_key_env, concurrency=concurrency,
                                     request_timeout_s=request_timeout_s, max_retries=max_retries,
                                     requests_per_second=requests_per_second, cache_dir=cache_dir,
                                     chat_template_kwargs=chat_template_kwargs, extra_body=extra_body,
                                     progress=progress, **backend_options)

    def request(self, example: dict[str, Any], response: str, vote: int, attempt: int) -> Request:
        # A retry after an unparseable reply needs a different reply: a fresh seed, and
        # sampling even when the judge is greedy (greedy decoding would repeat itself).
        temperature = self.temperature if attempt == 0 or self.temperature > 0 else self.retry_temperature
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": SYSTEM_PROMPT},
                         {"role": "user", "content": user_prompt(example, response)}],
            "temperature": temperature, "max_tokens": self.max_new_tokens,
            "seed": derive_seed(self.seed, "judge", example["id"], vote, attempt)}
        if self.backend.chat_template_kwargs:
            body["chat_template_kwargs"] = self.backend.chat_template_kwargs
        if self.guided:
            body["response_format"] = RESPONSE_FORMAT
        body.update(self.backend.extra_body)
        return Request("chat/completions", body, tag=("judge", vote, attempt))

    def judge(self, examples: list[dict[str, Any]], responses: list[str]) -> list[Verdict]:
        if len(examples) != len(responses):
            raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
        # An empty response answers nothing: C = H = 0 without asking, as the rule judge does.
        pending = [(i, v) for i, r in enumerate(responses) if r.strip() for v in range(self.votes)]
        ballots: dict[int, list[Ballot]] = {}
        last_error: dict[tuple[int, int], str] = {}
        for attempt in range(self.max_parse_attempts):
            if not pending:
                break
            replies = self.backend.complete([self.request(examples[i], responses[i], v, attempt) for i, v in pending])
            retry = []
            for (i, v), reply in zip(pending, replies, strict=True):
                try:
                    ballot = parse_verdict(reply.content)
                except VerdictParseError as e:
                    last_error[(i, v)] = str(e)
                    retry.append((i, v))
                    continue
                ballots.setdefault(i, []).append(ballot)
            pending = retry
        asked = sum(1 for r in responses if r.strip()) * self.votes
        if pending:
            frac = len(pending) / asked
            log.warning("%d of %d judge replies unparseable after %d attempts; e.g. %s", len(pending), asked,
                        self.max_parse_attempts, last_error[pending[0]])
            if frac > self.max_unparseable_fraction:
                raise RuntimeError(
                    f"{self.backend.base_url} ({self.model}): {len(pending)}/{asked} judge replies had no JSON verdict "
                    f"after {self.max_parse_attempts} attempts (limit {self.max_unparseable_fraction:.0%}); first: "
                    f"{last_error[pending[0]]}. Set guided: true if the server supports json_schema, or use a model "
                    "that follows the format")
        out = []
        for i, r in enumerate(responses):
            if not r.strip():
                out.append(Verdict(0, 0, "empty response"))
            elif i not in ballots:  # every vote unparseable: not kept, and said so
                out.append(Verdict(0, 0, f"no parseable verdict: {last_error[(i, 0)]}"))
            else:
                out.append(majority(ballots[i]))
        return out
