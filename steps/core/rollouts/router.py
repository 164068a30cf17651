"""router: Router-R1's routed decoding (arXiv 2506.09033): the policy thinks, calls models of a pool
with sub-questions, reads their answers and answers.

    policy:  <think> i need the city zono was born in </think> <search> rft : where was zono born ? </search>
    pool:    rft answers the query, given the example's documents      -> <information> ... </information>
    policy:  <think> dadada is in kestria </think> <answer> kestria </answer>

The pool (option `pool`, a list; params `router.pool`): per member a `name` (one lower-case word,
so that a word-level vocabulary can hold it), a `backend` (transformers in-process, vllm
in-process, or openai: any OpenAI-compatible endpoint, its `base_url` among `options`, with that
back end's retries), `model`, `price_per_million` (tokens; null: the member's decode TFLOPs per
million tokens, 2·N_active per token by the convention of steps.core.modeling, the context term
left out so that a price is a constant per token as an API's is) and a one-line `descriptor`.
The policy's prompt gets a system turn with the rules and one line per member (`routing_messages`).

Rules:
- A member answers the query with the example's documents as context (the `documents : ...`
  span of the policy's prompt) in the pipeline's prompt format; only its response (thinking
  dropped, any of our tags removed, at most `max_information_tokens`) is inserted, as
  `<information> ... </information>` with ownership mask 0: no loss, no length reward.
- At most `max_rounds` searches per response are answered; a search beyond them ends the
  response (`calls_over_limit`), as the reference's last turn, where no call is made.
- A search that is not `name : query` (one colon, a query that is not empty or a placeholder)
  or that names a member not in the pool is answered with an error inside `<information>`
  (`invalid_searches`, `unknown_member_calls`): the policy goes on, the format reward penalises it.
- A member call that fails (its back end's retries exhausted, or any error) is answered with an
  error inside `<information>` (`failed_calls`); the batch and the response go on.
- Decoding stops at `</answer>` (then `finish_reason` "stop": in training the end-of-sequence
  token follows, so the policy learns to stop there), at end of text, or at the budget
  (`max_new_tokens`: policy and inserted tokens together).

Batched in rounds: every unfinished sequence decodes until it closes a search or an answer (one
`generate` for all of them, per-row stopping), then the waiting queries go to each member in one
`generate` call (an OpenAI-compatible member runs them concurrently). Sampling is seeded per
(prompt, sample, segment): a sequence's text does not depend on what shares its batch.

Per response (`RolloutCompletion.meta`, report columns `extras/<key>`): `calls`, `calls_<member>`,
`tokens_<member>` (the member's generated tokens), `cost` (Σ tokens x price / 1e6), `rounds`,
`failed_calls`, `unknown_member_calls`, `invalid_searches`, `calls_over_limit`,
`information_tokens`; `reward_columns.cost` for the cost reward (steps/core/rewards/router.py);
`response` = "the answer is X ." from the answer block, the response the judge reads.

The comparison rows' protocols (`route_member`, `route_random`) are in route_single.py.

Where we depart from the reference (ulab-uiuc/Router-R1, router_r1/llm_agent/generation.py):
- its members answer the sub-question alone (open-domain QA from their own knowledge); here they
  get the example's documents, as every model of this pipeline does;
- it inserts "None" for a call that failed or named no member, and nothing for a malformed
  search; here each gets an error string saying what went wrong, so the policy can read it;
- the member's thinking is not inserted (its tags would break the format rules).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from steps.core import prompts as P
from steps.core.backends import SamplingParams, derive_seed, make_backend
from steps.core.rollouts import RolloutCompletion
from steps.core.rollouts.segments import generate_segments, single_token_id

log = logging.getLogger(__name__)

STOP_TAGS = ("</search>", "</answer>")
ROUTER_TAGS = ("<search>", "</search>", "<information>", "</information>", "<answer>", "</answer>")
ROUTER_MARK = "you may call a model of the pool"
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_LAST_SEARCH = re.compile(r"<search>(.*?)</search>\s*$", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
OUR_TAGS = re.compile(r"</?(?:think|search|information|answer)>")
_PLACEHOLDERS = frozenset({"", "query", "your-query", "your query", "..."})


@dataclass(frozen=True)
class Member:
    name: str
    backend: str = "transformers"
    model: str = ""
    price_per_million: float | None = None
    descriptor: str = ""
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"router pool: member name {self.name!r} must be one lower-case word ([a-z][a-z0-9_]*)")
        if self.price_per_million is None and self.backend == "openai":
            raise ValueError(f"router pool: member {self.name!r} is served over HTTP: set its price_per_million")
        if self.price_per_million is not None and self.price_per_million < 0:
            raise ValueError(f"router pool: member {self.name!r}: price_per_million must be >= 0")

    def spec(self) -> dict[str, Any]:
        return {"backend": self.backend, "model": self.model, **self.options}


def parse_pool(pool: Sequence[dict[str, Any]]) -> list[Member]:
    if not pool:
        raise ValueError("the router rollout needs a pool: options.pool = [{name, backend, model, ...}, ...]")
    members = []
    for i, m in enumerate(pool):
        unknown = set(m) - {"name", "backend", "model", "price_per_million", "descriptor", "options"}
        if unknown:
            raise ValueError(f"router pool[{i}]: unknown keys {sorted(unknown)}")
        members.append(Member(**m))
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"router pool: member names must be distinct, got {names}")
    return members


def routing_instructions(pool: Sequence[Member], max_rounds: int) -> str:
    """The system turn of the policy's prompt: the rules and one line per member."""
    lines = " ; ".join(f"{m.name} : {m.descriptor}".strip() for m in pool)
    return (f"answer the question . think inside <think> </think> first . {ROUTER_MARK} by writing "
            f"<search> name : query </search> , its reply comes back inside <information> </information> . "
            f"at most {max_rounds} calls . then write the short answer inside <answer> </answer> . "
            f"the pool : {lines}")


def routing_messages(messages: Sequence[dict[str, str]], pool: Sequence[Member], max_rounds: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": routing_instructions(pool, max_rounds)}, *messages]


def parse_query(content: str) -> tuple[str, str] | None:
    """`name : query` -> (name, query); None when malformed, empty or a placeholder."""
    if content.count(":") != 1:
        return None
    name, query = (s.strip() for s in content.split(":"))
    if query.lower() in _PLACEHOLDERS:
        return None
    return name.lower(), query


def documents_span(prompt_text: str) -> str:
    """The `documents : ...` span of the last user turn (without the question), or ''."""
    start, end = prompt_text.rfind("documents : "), prompt_text.rfind(" question : ")
    return prompt_text[start + len("documents : "):end].strip() if 0 <= start < end else ""


def member_prompt(backend: Any, span: str, query: str, key: str) -> P.Prompt:
    """A member's prompt: the documents span and the query in the pipeline's user-turn format,
    rendered by the member's own tokenizer (chat messages only for a server without one)."""
    docs = f"documents : {span} " if span else ""
    msgs = ({"role": "user", "content": f"{docs}question : {query} {P.INSTRUCTION}"},)
    mtok = getattr(backend, "tokenizer", None)
    text = mtok.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=True) if mtok is not None else ""
    return P.Prompt(messages=msgs, text=text, key=key)


_BACKENDS: dict[str, Any] = {}


def member_backend(member: Member) -> Any:
    """A member's back end, built once per spec per process (an RL stage builds a rollout per step)."""
    key = json.dumps(member.spec(), sort_keys=True, default=str)
    if key not in _BACKENDS:
        spec = member.spec()
        _BACKENDS[key] = make_backend(spec.pop("backend"), **spec)
    return _BACKENDS[key]


def release_members(pool: Sequence[Member]) -> None:
    for m in pool:
        backend = _BACKENDS.pop(json.dumps(m.spec(), sort_keys=True, default=str), None)
        if backend is not None:
            backend.close()


def member_price(member: Member, backend: Any) -> float:
    """Price per million tokens: the given one, or the member model's decode TFLOPs per million tokens."""
    if member.price_per_million is not None:
        return float(member.price_per_million)
    from steps.core import modeling

    model = getattr(backend, "model", None)
    profile = (modeling.flops_profile(model) if model is not None and hasattr(model, "named_parameters")
               else modeling.load_profile(member.model))
    return 2.0 * profile["n_active"] * 1e6 / 1e12


@dataclass
class _Row:
    prompt: P.Prompt
    j: int
    prompt_ids: list[int]
    span: str
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    segment: int = 0
    pending: str | None = None          # the content of the search waiting for an answer
    finish: str | None = None
    stats: dict[str, float] = field(default_factory=dict)


class RouterRollout:
    def __init__(self, backend: Any, pool: Sequence[dict[str, Any]] = (), max_rounds: int = 4,
                 max_information_tokens: int = 64, member_max_new_tokens: int = 64, member_temperature: float = 0.0,
                 chat_template_kwargs: dict[str, Any] | None = None, member_backends: dict[str, Any] | None = None):
        if getattr(backend, "model", None) is None or getattr(backend, "tokenizer", None) is None:
            raise ValueError(f"the router rollout decodes the policy in-process: it needs the transformers back end, "
                             f"got {getattr(backend, 'name', backend)!r}")
        if max_rounds < 0 or max_information_tokens < 1 or member_max_new_tokens < 1:
            raise ValueError("router: max_rounds >= 0, max_information_tokens >= 1 and member_max_new_tokens >= 1")
        self.backend, self.tokenizer, self.model = backend, backend.tokenizer, backend.model
        self.pool = parse_pool(pool)
        self.members = {m.name: (member_backends or {}).get(m.name) or member_backend(m) for m in self.pool}
        self.prices = {m.name: member_price(m, self.members[m.name]) for m in self.pool}
        self.max_rounds, self.max_information_tokens = max_rounds, max_information_tokens
        self.member_sampling = (member_max_new_tokens, member_temperature)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self._stop_ids = {single_token_id(self.tokenizer, t) for t in STOP_TAGS} - {None}
        self._text_stop = len(self._stop_ids) < len(STOP_TAGS)
        self.stats = {"calls": 0, "failed_calls": 0, "unknown_member_calls": 0, "invalid_searches": 0,
                      "calls_over_limit": 0}

    # --- prompts --------------------------------------------------------------------------------
    def routing_prompt(self, prompt: P.Prompt) -> P.Prompt:
        """The policy's prompt with the routing system turn (unchanged when it has one already:
        the RL stage renders its training prompts with it)."""
        if ROUTER_MARK in prompt.text:
            return prompt
        if not prompt.messages:
            raise ValueError(f"router: prompt {prompt.key!r} has neither the routing instructions nor chat messages")
        msgs = routing_messages(prompt.messages, self.pool, self.max_rounds)
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                  **self.chat_template_kwargs)
        return P.Prompt(messages=tuple(msgs), text=text, key=prompt.key, meta=prompt.meta)

    # --- decoding -------------------------------------------------------------------------------
    def run(self, prompts: Sequence[P.Prompt], sampling: SamplingParams, on_batch=None) -> list[list[RolloutCompletion]]:
        per_chunk = max(1, int(getattr(self.backend, "batch_size", 64) or 64) // sampling.n)
        results: list[list[RolloutCompletion]] = []
        for start in range(0, len(prompts), per_chunk):
            chunk = self._run_chunk(prompts[start:start + per_chunk], sampling)
            results += chunk
            if on_batch:
                on_batch(list(range(start, start + len(chunk))), chunk)
        return results

    def _run_chunk(self, prompts: Sequence[P.Prompt], sampling: SamplingParams) -> list[list[RolloutCompletion]]:
        t0 = time.perf_counter()
        tok = self.tokenizer
        routed = [self.routing_prompt(p) for p in prompts]
        rows = [_Row(p, j, tok(p.text, add_special_tokens=False)["input_ids"], documents_span(p.text),
                     stats=self._zero_stats())
                for p in routed for j in range(sampling.n)]
        while any(r.finish is None for r in rows):
            writing = [r for r in rows if r.finish is None and r.pending is None]
            if writing:
                self._policy_step(writing, sampling)
            waiting = [r for r in rows if r.finish is None and r.pending is not None]
            if waiting:
                self._route_step(waiting, sampling)
        elapsed = (time.perf_counter() - t0) / max(1, len(rows))
        outs = [self._completion(r, elapsed) for r in rows]
        return [outs[i * sampling.n:(i + 1) * sampling.n] for i in range(len(prompts))]

    def _zero_stats(self) -> dict[str, float]:
        return {"calls": 0, "rounds": 0, "cost": 0.0, "failed_calls": 0, "unknown_member_calls": 0,
                "invalid_searches": 0, "calls_over_limit": 0,
                **{f"calls_{m.name}": 0 for m in self.pool}, **{f"tokens_{m.name}": 0 for m in self.pool}}

    def _policy_step(self, rows: list[_Row], sampling: SamplingParams) -> None:
        tok, budget = self.tokenizer, sampling.max_new_tokens
        limits = [budget - len(r.ids) for r in rows]
        # Segment 0 draws as the plain back end does (same seed); later ones from their own streams.
        seeds = [derive_seed(sampling.seed, r.prompt.key, r.j) if r.segment == 0
                 else derive_seed(sampling.seed, r.prompt.key, r.j, "router", r.segment) for r in rows]
        segments = generate_segments(self.backend, [r.prompt_ids + r.ids for r in rows], seeds, limits,
                                     sampling.temperature, sampling.top_p, self._stop_ids,
                                     STOP_TAGS if self._text_stop else ())
        for r, seg in zip(rows, segments, strict=True):
            r.segment += 1
            kept, ended, closed = seg.ids, seg.ended, seg.closed
            r.ids += kept
            r.mask += [1] * len(kept)
            text = tok.decode(kept, skip_special_tokens=True).rstrip() if closed else ""
            if ended or (closed and text.endswith("</answer>")):
                r.finish = "stop"
            elif closed:
                m = _LAST_SEARCH.search(text)
                if r.stats["rounds"] >= self.max_rounds:
                    r.stats["calls_over_limit"] += 1
                    r.finish = "stop"
                else:
                    r.pending = m.group(1) if m else ""
            if r.finish is None and r.pending is None and len(r.ids) >= budget:
                r.finish = "length"

    def _route_step(self, rows: list[_Row], sampling: SamplingParams) -> None:
        """Answer every waiting search: errors at once, valid queries in one call per member."""
        answers: dict[int, str] = {}
        by_member: dict[str, list[tuple[int, str]]] = {}
        for i, r in enumerate(rows):
            r.stats["rounds"] += 1
            parsed = parse_query(r.pending or "")
            if parsed is None:
                r.stats["invalid_searches"] += 1
                answers[i] = "error : write the search as name : query , with a real question"
            elif parsed[0] not in self.members:
                r.stats["unknown_member_calls"] += 1
                answers[i] = f"error : there is no model named {parsed[0]} ; the pool : {' , '.join(self.members)}"
            else:
                by_member.setdefault(parsed[0], []).append((i, parsed[1]))
        max_new, temperature = self.member_sampling
        for name, items in by_member.items():
            backend = self.members[name]
            prompts = [self._member_prompt(backend, rows[i], q, name) for i, q in items]
            sp = SamplingParams(n=1, temperature=temperature, top_p=sampling.top_p, max_new_tokens=max_new,
                                seed=derive_seed(sampling.seed, "router-member"))
            try:
                outs = [o[0] for o in backend.generate(prompts, sp)]
            except Exception as e:  # noqa: BLE001 - isolate the failing requests: one at a time
                log.warning("router: a call to %s for %d queries failed (%s); retrying them one by one", name, len(items), e)
                outs = []
                for p in prompts:
                    try:
                        outs.append(backend.generate([p], sp)[0][0])
                    except Exception as e1:  # noqa: BLE001 - a member that stays down answers with an error
                        log.warning("router: %s failed for %s: %s", name, p.key, e1)
                        outs.append(None)
            for (i, _), c in zip(items, outs, strict=True):
                r = rows[i]
                if c is None:
                    r.stats["failed_calls"] += 1
                    answers[i] = f"error : {name} is unavailable , try another model"
                    continue
                r.stats["calls"] += 1
                r.stats[f"calls_{name}"] += 1
                r.stats[f"tokens_{name}"] += int(c.completion_tokens)
                r.stats["cost"] += int(c.completion_tokens) * self.prices[name] / 1e6
                answers[i] = OUR_TAGS.sub(" ", P.split_completion(c.text)[1]).strip() or "no answer"
        for i, r in enumerate(rows):
            self._insert(r, answers[i], sampling.max_new_tokens)

    def _member_prompt(self, backend: Any, r: _Row, query: str, name: str) -> P.Prompt:
        return member_prompt(backend, r.span, query, f"{r.prompt.key}/{r.j}/{name}/{r.stats['rounds']}")

    def _insert(self, r: _Row, answer: str, budget: int) -> None:
        tok = self.tokenizer
        body = tok(answer, add_special_tokens=False)["input_ids"][: self.max_information_tokens]
        text = f" <information> {tok.decode(body, skip_special_tokens=True)} </information> "
        ids = tok(text, add_special_tokens=False)["input_ids"][: max(0, budget - len(r.ids))]
        r.ids += ids
        r.mask += [0] * len(ids)
        r.pending = None
        if len(r.ids) >= budget:
            r.finish = "length"

    def _completion(self, r: _Row, latency: float) -> RolloutCompletion:
        text = self.tokenizer.decode(r.ids, skip_special_tokens=True).strip()
        found = _ANSWER.findall(text)
        meta: dict[str, Any] = {**r.stats, "information_tokens": len(r.mask) - sum(r.mask),
                                "reward_columns": {"cost": r.stats["cost"]}}
        for k in self.stats:
            self.stats[k] += r.stats[k]
        return RolloutCompletion(text=text, token_ids=tuple(r.ids), mask=tuple(r.mask), prompt_tokens=len(r.prompt_ids),
                                 finish_reason=r.finish or "length", latency_s=latency, meta=meta,
                                 response=f"the answer is {found[-1].strip()} ." if found else "")

    def close(self) -> None:
        self.backend.close()
        release_members(self.pool)


PROTOCOLS = {
    "router": lambda backend, **o: RouterRollout(backend, **o),
}
