"""Generation over any OpenAI-compatible endpoint (vLLM serve, SGLang, a hosted API).

    backend = OpenAIBackend(model="Qwen/Qwen3-30B-A3B", base_url="http://gpu-0:8000/v1",
                            concurrency=64, cache_dir="data/.cache/openai")
    outs = backend.generate(prompts, SamplingParams(n=4, temperature=1.0, max_new_tokens=1024))

One HTTP request per (prompt, sample index), never `n=k` in one request: each sample then
has its own seed (`derive_seed(seed, prompt key, j)`) and its own cache entry, so a killed run
re-requests only the samples it never received. Requests run on asyncio with bounded
concurrency, an optional requests-per-second limit and a per-request timeout; tenacity is the
one retry policy (exponential back-off with jitter, honouring `retry-after`) for 429, 5xx,
timeouts, connection errors and malformed bodies; other 4xx fail at once, naming the URL and
the server's message. The key is read from the environment variable that `api_key_env` names
(OPENAI_API_KEY by default), never from params. The persistent cache is keyed by what determines a reply (model, the
prompt content, sampling parameters, seed, sample index), not by the server's URL, so moving
to another replica of the same model re-uses it; a fully cached run makes no HTTP request.
Entries are written to a temporary file and renamed, so a killed process never leaves a torn
one. Reasoning servers return the trace in `message.reasoning_content` (or `reasoning`); it is
folded into the text as `<think> T </think> R`, the one format the pipeline splits.
Token counts are the server's (`usage`); a reply without them is counted here, with the local
`tokenizer` when one is configured (whitespace-separated words otherwise), marked
`tokens_estimated`, and a warning says how many replies were counted so.

Several servers of the same model: `base_url` takes a list (`base_url: [http://gpu-0:8000/v1,
http://gpu-1:8000/v1]`). Requests go to the live server with the fewest outstanding; servers
are health-checked at the start of a call and whenever one starts failing; a server that fails
(connection refused or reset, timeouts, 5xx) is marked down and its requests in flight move to
the others without spending their retries; a server that comes back is re-admitted after a
passing health check; when every server is down, the call waits at most `all_down_timeout_s`
and then fails naming them (steps.core.server_pool). `concurrency` bounds the requests in flight
across all servers together: raise it with their number. `stats.servers` says, per server, what it
served, how many requests were moved off it and how often it went down; `stats.summary()` is
what the sample stage writes into its stats.json.

`complete(requests)` is the general entry point (raw replies, caching, retries); the LLM judge
uses it with its own request bodies, so caching and retries exist once.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from steps.core import secrets
from steps.core.backends import Completion, SamplingParams, derive_seed
from steps.core.io import write_json
from steps.core.prompts import THINK_OPEN, Prompt, join_completion
from steps.core.server_pool import AllServersDown, Moved, ServerPool, ServerStats, describe

log = logging.getLogger(__name__)

CACHE_VERSION = 1
RETRY_AFTER_CAP_S = 300.0
_RETRY_STATUS = frozenset({408, 409, 425, 429})
_STOP_REASONS = frozenset({"stop", "eos", "end_turn", "stop_sequence", "tool_calls", "function_call",
                           "content_filter"})
_LENGTH_REASONS = frozenset({"length", "max_tokens", "model_length"})


class BackendError(RuntimeError):
    """A request that failed for good; the message names the URL and what the server said."""


class RetryableError(Exception):
    """A failure worth another attempt (429, 5xx, timeout, lost connection, malformed body)."""

    def __init__(self, kind: str, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.kind = kind  # counted in Stats.by_error: "http 429", "timeout", "connection", "malformed"
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Request:
    """One HTTP request: the JSON body sent to `endpoint`, plus cache-key parts not sent."""
    endpoint: Literal["chat/completions", "completions"]
    body: dict[str, Any]
    tag: tuple[Any, ...] = ()  # e.g. ("sample", j): keeps samples apart even if seeds collide

    def cache_key(self) -> str:
        blob = json.dumps([CACHE_VERSION, self.endpoint, self.body, list(self.tag)], sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class Reply:
    content: str
    reasoning: str | None
    finish_reason: Literal["stop", "length"]
    completion_tokens: int
    prompt_tokens: int
    latency_s: float
    tokens_estimated: bool = False  # the server sent no usage: counted here (parse_reply)

    def text(self) -> str:
        """`<think> T </think> R` when the server sent the trace apart; otherwise as sent."""
        if not self.reasoning:
            return self.content
        if self.finish_reason == "length" and not self.content.strip():
            # The budget ran out inside the trace: no closing tag, so split_completion reads it
            # as unfinished thinking with an empty response, as it does for inline traces.
            return f"{THINK_OPEN} {self.reasoning.strip()}"
        return join_completion(self.reasoning.strip(), self.content.strip())

    def completion(self) -> Completion:
        return Completion(text=self.text(), completion_tokens=self.completion_tokens,
                          finish_reason=self.finish_reason, prompt_tokens=self.prompt_tokens,
                          latency_s=self.latency_s, tokens_estimated=self.tokens_estimated)


class ResponseCache:
    """One JSON file per request key under `root/ab/abcd....json`, written atomically."""

    def __init__(self, root: Path | str):
        self.root = str(root)

    def _path(self, key: str) -> str:
        # Plain strings, not pathlib: a cached re-run is all lookups, and pathlib's object
        # churn was 40% of their cost.
        return os.path.join(self.root, key[:2], key + ".json")

    def get(self, key: str) -> Reply | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                entry = json.loads(f.read())
            return Reply(**entry["reply"])
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            # Renames make torn entries impossible after a kill; this is a disk fault or a
            # hand edit. The request is simply made again and the entry rewritten.
            log.warning("%s: unreadable cache entry (%s); requesting again", path, e)
            return None

    def put(self, key: str, reply: Reply) -> None:
        write_json(self._path(key), {"version": CACHE_VERSION, "reply": asdict(reply)})


class _RateLimiter:
    """Spaces request starts at least 1/rps apart (a hosted API's requests-per-second quota)."""

    def __init__(self, requests_per_second: float):
        self.interval_s = 1.0 / requests_per_second
        self.next_s = 0.0
        self.lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_s)
            self.next_s = start + self.interval_s
        if start > now:
            await asyncio.sleep(start - now)


def run_sync(coro: Any) -> Any:
    """Run a coroutine to completion from synchronous code, even under a running event loop
    (a notebook, an async orchestrator), where asyncio.run would refuse: then in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return max(0.0, float(value) * scale)
            except ValueError:
                return None  # an HTTP date: rare from model servers; fall back to back-off
    return None


def _base_urls(base_url: str | Sequence[str]) -> tuple[str, ...]:
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    if not urls or not all(isinstance(u, str) and u.strip() for u in urls):
        raise ValueError(f"base_url: expected a URL or a non-empty list of URLs, got {base_url!r}")
    out = tuple(u.strip().rstrip("/") for u in urls)
    if len(set(out)) < len(out):
        raise ValueError(f"base_url: a server is listed twice: {list(out)}")
    return out


def _words(text: str) -> int:
    return len(text.split())


def parse_reply(data: Any, latency_s: float, count_tokens: Callable[[str], int] | None = None,
                prompt_text: str | Callable[[], str] | None = None) -> Reply:
    """An OpenAI chat or text completion body -> Reply; RetryableError if it is not one.
    Counts missing from `usage` are made with `count_tokens` (whitespace words without one) over
    the reply and `prompt_text`, and the reply is marked `tokens_estimated`."""
    try:
        choice = data["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise RetryableError("malformed", f"malformed reply: no choices in {str(data)[:200]!r}") from None
    message = choice.get("message")
    if isinstance(message, dict):
        content = message.get("content") or ""
        reasoning = message.get("reasoning_content") or message.get("reasoning") or None
    elif "text" in choice:
        content, reasoning = choice.get("text") or "", None
    else:
        raise RetryableError("malformed", f"malformed reply: a choice without message or text: {str(choice)[:200]!r}")
    raw_reason = choice.get("finish_reason")
    if raw_reason in _LENGTH_REASONS:
        finish: Literal["stop", "length"] = "length"
    elif raw_reason in _STOP_REASONS or raw_reason is None:
        finish = "stop"
    elif raw_reason == "abort":  # vLLM aborted the sequence (preemption, shutdown): try again
        raise RetryableError("aborted", "the server aborted the request (finish_reason 'abort')")
    else:
        raise BackendError(f"unknown finish_reason {raw_reason!r}; expected one of "
                           f"{sorted(_STOP_REASONS | _LENGTH_REASONS)}")
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    count = count_tokens or _words
    tokens, prompt_tokens, estimated = usage.get("completion_tokens"), usage.get("prompt_tokens"), False
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 0:
        # Some servers omit usage. Counted here and marked, never left at 0: the length reward,
        # the reports and the FLOPs all read these counts.
        tokens, estimated = count(reasoning or "") + count(content), True
    if not isinstance(prompt_tokens, int) or isinstance(prompt_tokens, bool) or prompt_tokens < 0:
        text = prompt_text() if callable(prompt_text) else prompt_text  # rendered only when needed
        prompt_tokens, estimated = (count(text) if text else 0), True
    return Reply(content=content, reasoning=reasoning, finish_reason=finish, completion_tokens=tokens,
                 prompt_tokens=prompt_tokens, latency_s=latency_s, tokens_estimated=estimated)


@dataclass
class Stats:
    http_requests: int = 0  # every attempt sent, retries included
    retries: int = 0
    cache_hits: int = 0
    tokens_estimated: int = 0  # replies without `usage`, counted here
    by_error: dict[str, int] = field(default_factory=dict)
    servers: dict[str, ServerStats] = field(default_factory=dict)  # per base URL (steps.core.server_pool)

    @property
    def requests_moved(self) -> int:
        """Requests taken off a server that went down and sent to another."""
        return sum(s.moved_off for s in self.servers.values())

    @property
    def servers_went_down(self) -> list[str]:
        return [url for url, s in self.servers.items() if s.went_down]

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for a stage's stats.json."""
        return {"http_requests": self.http_requests, "retries": self.retries, "cache_hits": self.cache_hits,
                "tokens_estimated": self.tokens_estimated, "by_error": dict(self.by_error),
                "requests_moved": self.requests_moved, "servers_went_down": self.servers_went_down,
                "servers": {url: asdict(s) for url, s in self.servers.items()}}


class OpenAIBackend:
    name = "openai"
    # Options that decide how requests travel, never what a completion is: a resumed stage keeps
    # its finished shards when only these change (e.g. a server added to base_url after a kill).
    TRANSPORT_OPTIONS = frozenset({"base_url", "api_key_env", "concurrency", "request_timeout_s", "max_retries",
                                   "requests_per_second", "cache_dir", "backoff_initial_s", "backoff_max_s",
                                   "progress", "health_timeout_s", "all_down_timeout_s"})

    def __init__(self, model: str, base_url: str | list[str] = "http://127.0.0.1:8000/v1",
                 api_key_env: str | None = "OPENAI_API_KEY", concurrency: int = 32,
                 request_timeout_s: float = 600.0, max_retries: int = 8,
                 requests_per_second: float | None = None, cache_dir: str | None = None, use_chat: bool = True,
                 chat_template_kwargs: dict[str, Any] | None = None, extra_body: dict[str, Any] | None = None,
                 tokenizer: str | None = None, max_tokens_field: str = "max_tokens",
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0, progress: bool = True,
                 health_timeout_s: float = 10.0, all_down_timeout_s: float = 120.0):
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        if request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be > 0, got {request_timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if requests_per_second is not None and requests_per_second <= 0:
            raise ValueError(f"requests_per_second must be > 0 or null, got {requests_per_second}")
        if health_timeout_s <= 0 or all_down_timeout_s <= 0:
            raise ValueError(f"health_timeout_s and all_down_timeout_s must be > 0, got {health_timeout_s}, "
                             f"{all_down_timeout_s}")
        self.model = model
        self.base_urls = _base_urls(base_url)
        self.base_url = ", ".join(self.base_urls)  # for messages
        # The key lives only in the environment; params name the variable (steps.core.secrets).
        self.api_key = secrets.from_env(api_key_env, "api_key_env") or "EMPTY"
        self.concurrency, self.request_timeout_s, self.max_retries = concurrency, request_timeout_s, max_retries
        self.requests_per_second, self.use_chat = requests_per_second, use_chat
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.extra_body = dict(extra_body or {})
        self.max_tokens_field = max_tokens_field
        self.backoff_max_s, self.progress = backoff_max_s, progress
        self._backoff = wait_exponential_jitter(multiplier=backoff_initial_s, max=backoff_max_s,
                                                jitter=backoff_initial_s)
        self.cache = ResponseCache(cache_dir) if cache_dir else None
        self.stats = Stats()
        # A server that answers its health check yet fails as many requests in a row as one
        # request may retry is no better than a dead one, while another is up.
        self.pool = ServerPool(self.base_urls, self.stats.servers, {"Authorization": f"Bearer {self.api_key}"},
                               health_timeout_s=health_timeout_s, all_down_timeout_s=all_down_timeout_s,
                               failures_to_down=max_retries + 1, backoff=self._backoff,
                               backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s)
        # None: the sample stage sends chat messages and the server applies its chat template.
        # A local tokenizer directory lets it render text instead, which use_chat=False needs.
        self.tokenizer: Any = None
        if tokenizer:
            from transformers import AutoTokenizer
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` by the local tokenizer; whitespace-separated words without one."""
        if self.tokenizer is None:
            return _words(text)
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_text(self, request: Request) -> str:
        """What the server tokenised for `request`, as near as this side can tell: the rendered
        chat template with a local tokenizer, the message contents joined without one."""
        body = request.body
        if "prompt" in body:
            return str(body["prompt"])
        msgs = body.get("messages") or []
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            try:
                return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                                          **(body.get("chat_template_kwargs") or {}))
            except Exception:  # a template that wants other roles: the contents are close enough
                pass
        return " ".join(str(m.get("content", "")) for m in msgs)

    # -- generation ---------------------------------------------------------------------------

    def request_for(self, prompt: Prompt, sampling: SamplingParams, j: int) -> Request:
        body: dict[str, Any] = {"model": self.model, "temperature": sampling.temperature, "top_p": sampling.top_p,
                                self.max_tokens_field: sampling.max_new_tokens,
                                "seed": derive_seed(sampling.seed, prompt.key, j)}
        if self.use_chat:
            if not prompt.messages:
                raise ValueError(f"prompt {prompt.key!r}: use_chat needs chat messages, the prompt has none")
            body["messages"] = [dict(m) for m in prompt.messages]
            kwargs = {**self.chat_template_kwargs, **(prompt.meta.get("chat_template_kwargs") or {})}
            if kwargs:  # vLLM and SGLang read the template switches (enable_thinking) from here
                body["chat_template_kwargs"] = kwargs
        else:
            if not prompt.text:
                raise ValueError(f"prompt {prompt.key!r}: use_chat=false sends rendered text, and the prompt has "
                                 "none; give the back end `tokenizer: <local tokenizer dir>` or set use_chat: true")
            body["prompt"] = prompt.text
        body.update(self.extra_body)
        return Request("chat/completions" if self.use_chat else "completions", body, tag=("sample", j))

    def generate(self, prompts: Sequence[Prompt], sampling: SamplingParams,
                 on_batch: Callable[[list[int], list[list[Completion]]], None] | None = None,
                 ) -> list[list[Completion]]:
        n = sampling.n
        requests = [self.request_for(p, sampling, j) for p in prompts for j in range(n)]
        results: list[list[Completion | None]] = [[None] * n for _ in prompts]
        missing = [n] * len(prompts)

        def done(items: list[tuple[int, Reply]]) -> None:
            finished = []
            for r, reply in items:
                i, j = divmod(r, n)
                results[i][j] = reply.completion()
                missing[i] -= 1
                if missing[i] == 0:
                    finished.append(i)
            if finished and on_batch:
                on_batch(finished, [list(results[i]) for i in finished])  # type: ignore[arg-type]

        self.complete(requests, on_done=done)
        return [list(cs) for cs in results]  # type: ignore[arg-type]

    # -- the request machinery (shared with the LLM judge) ----------------------------------------

    def complete(self, requests: Sequence[Request],
                 on_done: Callable[[list[tuple[int, Reply]]], None] | None = None) -> list[Reply]:
        """One reply per request, in order. `on_done(items)` hears of replies as they land: all
        cache hits in one call first, then each network reply (with its duplicates)."""
        replies: list[Reply | None] = [None] * len(requests)
        keys = [r.cache_key() for r in requests]
        hits = []
        if self.cache:
            for i, key in enumerate(keys):
                replies[i] = self.cache.get(key)
                if replies[i] is not None:
                    hits.append(i)
        self.stats.cache_hits += len(hits)
        if hits and on_done:
            on_done([(i, replies[i]) for i in hits])  # type: ignore[misc]
        groups: dict[str, list[int]] = {}
        for i, key in enumerate(keys):  # identical requests (same judge input) are sent once
            if replies[i] is None:
                groups.setdefault(key, []).append(i)
        if groups:
            retries_before, estimated_before = self.stats.retries, self.stats.tokens_estimated
            moved_before = {u: (s.served, s.moved_off) for u, s in self.stats.servers.items()}
            try:
                run_sync(self._fetch_all(requests, groups, replies, on_done))
            finally:
                estimated = self.stats.tokens_estimated - estimated_before
                if estimated:  # one line per call, with the count, never silently
                    how = (f"with the local tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r}" if self.tokenizer
                           else "as whitespace-separated words (set the back end's `tokenizer` to a local tokenizer "
                                "directory for token counts)")
                    log.warning("%s: %d of %d replies carried no usage; their token counts were estimated %s",
                                self.base_url, estimated, sum(len(v) for v in groups.values()), how)
            if self.stats.retries > retries_before:  # one summary line, not one per hiccup
                log.warning("%s: %d retries so far (by error: %s)", self.base_url, self.stats.retries,
                            self.stats.by_error)
            if any(s.moved_off > moved_before.get(u, (0, 0))[1] for u, s in self.stats.servers.items()):
                log.warning("requests moved between servers in this call: %s", describe(self.stats.servers,
                                                                                      moved_before))
        return replies  # type: ignore[return-value]

    async def _fetch_all(self, requests: Sequence[Request], groups: dict[str, list[int]],
                         replies: list[Reply | None],
                         on_done: Callable[[list[tuple[int, Reply]]], None] | None) -> None:
        from tqdm import tqdm

        limiter = _RateLimiter(self.requests_per_second) if self.requests_per_second else None
        todo = sum(len(v) for v in groups.values())
        bar = tqdm(total=len(requests), initial=len(requests) - todo, unit="req", desc=f"openai {self.model}",
                   disable=not self.progress, dynamic_ncols=True, smoothing=0.1)
        # aiohttp rather than httpx: httpcore's pool rescans every connection for every request,
        # which cost 16 ms of CPU per request at concurrency 128 (13x slower end to end than
        # aiohttp's 0.3 ms, measured against the fake server); trust_env keeps proxies and CAs.
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s, connect=min(30.0, self.request_timeout_s))
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {self.api_key}"}, connector=connector,
                                         timeout=timeout, trust_env=True) as client, self.pool.running():
            work = iter(groups.items())

            async def worker() -> None:
                # `concurrency` workers share one iterator, rather than one task per request
                # behind a semaphore: memory stays flat for a judge call of 100k requests, and
                # a worker backing off from a 429 keeps its slot, easing the load as it should.
                for key, idxs in work:
                    reply = await self._fetch(client, limiter, requests[idxs[0]])
                    if self.cache:
                        self.cache.put(key, reply)
                    for i in idxs:
                        replies[i] = reply
                    bar.update(len(idxs))
                    if on_done:
                        on_done([(i, reply) for i in idxs])

            try:
                async with asyncio.TaskGroup() as tg:
                    for _ in range(min(self.concurrency, len(groups))):
                        tg.create_task(worker())
            except BaseExceptionGroup as eg:
                # One failure stops the call (replies already received were handed to on_done
                # and cached); raise it as itself so callers can catch BackendError.
                if len(eg.exceptions) > 1:
                    log.error("%d requests failed; the first is raised", len(eg.exceptions))
                raise eg.exceptions[0] from None
            finally:
                bar.close()

    async def _fetch(self, client: aiohttp.ClientSession, limiter: _RateLimiter | None, request: Request) -> Reply:
        # A move (the server went down under the request) starts the retries afresh on the
        # others; the cap only guarantees an end when servers keep coming back and failing.
        max_moves = 3 * len(self.base_urls) * (self.max_retries + 1)
        failed_on: set[str] = set()  # servers this request failed on: its retries go elsewhere
        for _ in range(max_moves + 1):
            retrying = AsyncRetrying(stop=stop_after_attempt(self.max_retries + 1), wait=self._wait,
                                     retry=retry_if_exception_type(RetryableError), before_sleep=self._note_retry,
                                     reraise=True)
            url = self.base_urls[0]
            try:
                async for attempt in retrying:
                    with attempt:
                        if limiter:
                            await limiter.acquire()
                        server = await self.pool.acquire(avoid=frozenset(failed_on))
                        url = server.url
                        try:
                            return await self.pool.send(server, self._post(client, url, request))
                        except RetryableError as e:
                            failed_on.add(url)
                            await self.pool.failed(server, e.kind, str(e))  # Moved when the server is down
                            raise
            except Moved:
                continue
            except AllServersDown as e:
                raise BackendError(f"{request.endpoint}: {e}") from None
            except RetryableError as e:
                raise BackendError(f"{url}/{request.endpoint}: gave up after {self.max_retries + 1} "
                                   f"attempts; last error: {e}") from e
        raise BackendError(f"{request.endpoint}: moved {max_moves} times between servers that keep going down "
                           f"and coming back: {describe(self.stats.servers)}")

    async def _post(self, client: aiohttp.ClientSession, base_url: str, request: Request) -> Reply:
        self.stats.http_requests += 1
        url = f"{base_url}/{request.endpoint}"
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.request_timeout_s):  # bounds a slow trickle too
                async with client.post(url, json=request.body) as resp:
                    status, headers, raw = resp.status, resp.headers, await resp.read()
        except TimeoutError:  # asyncio's and aiohttp's timeouts are both TimeoutError
            raise RetryableError("timeout", f"no reply within request_timeout_s={self.request_timeout_s}") from None
        except aiohttp.ClientError as e:  # refused, reset, disconnected, truncated body
            raise RetryableError("connection", f"connection error: {type(e).__name__}: {e}") from None
        latency_s = time.perf_counter() - t0
        text = raw.decode("utf-8", errors="replace")
        if status in _RETRY_STATUS or status >= 500:
            raise RetryableError(f"http {status}", f"HTTP {status}: {text[:200]}", _retry_after_s(headers))
        if status >= 400:
            raise BackendError(f"{url}: HTTP {status} (not retried; fix the request or the server's options): "
                               f"{text[:500]}")
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RetryableError("malformed", f"malformed JSON body ({e}): {text[:120]!r}") from None
        if not isinstance(data, dict):
            raise RetryableError("malformed", f"malformed reply: not a JSON object: {text[:120]!r}")
        reply = parse_reply(data, latency_s, self.count_tokens, lambda: self.prompt_text(request))
        if reply.tokens_estimated:
            self.stats.tokens_estimated += 1
        return reply

    def _wait(self, state: RetryCallState) -> float:
        backoff = self._backoff(state)
        exc = state.outcome.exception() if state.outcome else None
        after = getattr(exc, "retry_after_s", None)
        # The server knows when its quota frees up: wait that long, even past the back-off cap
        # (retrying sooner only earns another 429), plus a little jitter so the throttled
        # requests do not all return at once; a nonsense value is bounded all the same.
        return min(RETRY_AFTER_CAP_S, after + backoff * 0.1) if after is not None else backoff

    def _note_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        kind = getattr(exc, "kind", type(exc).__name__)
        self.stats.retries += 1
        self.stats.by_error[kind] = self.stats.by_error.get(kind, 0) + 1
        log.info("retry %d after %s", state.attempt_number, exc)

    def close(self) -> None:
        """Nothing held between calls: each generate() opens and closes its own connections."""
