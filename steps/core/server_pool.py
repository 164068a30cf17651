"""Several OpenAI-compatible servers behind one back end: balancing, health checks, fail-over.

    pool = ServerPool(["http://gpu-0:8000/v1", "http://gpu-1:8000/v1"], stats, headers, ...)
    async with pool.running():                  # one generate()/complete() call
        server = await pool.acquire()           # the live server with the fewest outstanding
        reply = await pool.send(server, post(server.url))   # Moved if it goes down meanwhile

Balancing: each attempt goes to the live server with the fewest requests outstanding from this
client (ties: the one picked least recently). A slower or busier server holds its requests
longer and so receives fewer, which a round robin would not do. A retry goes to a live server
this request has not failed on yet, where there is one: a server that fails fast has the fewest
outstanding, and would otherwise take every retry of the same request while it is re-admitted
between failures (it passes its health check, and a re-admission starts its count afresh).

Health: `GET <root>/health` (vLLM and SGLang answer 200 while the engine lives and 5xx once it
died; `<root>` is the URL without its `/v1`) and, where a server has no such route, `GET
<base_url>/models`, which every OpenAI-compatible server has; any answer below 500 counts as
alive (a 401 says the server is there). Servers are checked when a call starts (those never
checked and those down) and whenever a request to one fails in a way that may mean it is gone:
connection refused or reset, a timeout, a 5xx, an aborted generation. A failed check marks the
server down: its in-flight requests are cancelled and go to the others at once, without spending
their retries; queued requests only ever go to live servers. A server that passes its check but
fails `failures_to_down` requests in a row is marked down too, while another server is up (with
one server left, the requests' own retries decide, as with a single server).

A down server is checked again with exponential back-off (tenacity) for as long as the call runs,
the first check later each time it went down, and re-admitted once one passes. While every
server is down, requests wait at most `all_down_timeout_s` for one to come back, then the call
fails with an error that names every server and why it is down: never a hang.

A moved request is sent again; its reply is delivered once (the one that arrives), so a row is
written once. The dead server may have computed the first reply too: nobody ever sees it.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception_type

log = logging.getLogger(__name__)

T = TypeVar("T")
# Failures that may mean the server itself is gone, rather than this one request (429, a
# malformed body): they trigger a health check and count towards `failures_to_down`.
_SERVER_FAULTS = frozenset({"connection", "timeout", "aborted"})


def server_fault(kind: str) -> bool:
    """Whether a RetryableError kind ("http 503", "timeout", ...) may mean the server is gone."""
    return kind in _SERVER_FAULTS or (kind.startswith("http 5") and len(kind) == 8)


class Moved(Exception):
    """The request's server went down under it: send it to another (a move, not a retry)."""


class AllServersDown(RuntimeError):
    """Every server stayed down for all_down_timeout_s; the message names each and why."""


class _StillDown(Exception):
    pass


@dataclass
class ServerStats:
    """What one server did for this back end, over all its calls."""
    sent: int = 0        # attempts sent to it, retries included
    served: int = 0      # replies it delivered
    moved_off: int = 0   # requests taken off it when it went down, and sent to the others
    went_down: int = 0   # times it was marked down (at a start check, a failed check, failures in a row)
    readmitted: int = 0  # times a health check brought it back
    up: bool = True
    why_down: str = ""   # the last reason it was marked down


@dataclass(eq=False)
class _Server:
    url: str
    stats: ServerStats
    checked: bool = False          # health known at least once
    health_url: str | None = None  # the route that answered, asked first from then on
    outstanding: int = 0
    last_pick: int = 0
    failures_in_row: int = 0
    tasks: set[asyncio.Future[Any]] = field(default_factory=set)
    check_task: asyncio.Task[bool] | None = None
    probe_task: asyncio.Task[None] | None = None

    @property
    def root(self) -> str:
        return self.url[:-3] if self.url.endswith("/v1") else self.url


class ServerPool:
    def __init__(self, urls: Sequence[str], stats: dict[str, ServerStats], headers: Mapping[str, str],
                 health_timeout_s: float, all_down_timeout_s: float, failures_to_down: int,
                 backoff: Callable[..., float], backoff_initial_s: float, backoff_max_s: float):
        self.servers = [_Server(u, stats.setdefault(u, ServerStats())) for u in urls]
        self.headers = dict(headers)
        self.health_timeout_s, self.all_down_timeout_s = health_timeout_s, all_down_timeout_s
        self.failures_to_down = failures_to_down
        self.backoff, self.backoff_initial_s, self.backoff_max_s = backoff, backoff_initial_s, backoff_max_s
        self._picks = 0
        self._up: asyncio.Event | None = None
        self._client: aiohttp.ClientSession | None = None

    # -- one call -------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ServerPool]:
        """The state of one call (asyncio objects belong to its event loop): a session of its
        own for health checks, so that they never queue behind stalled requests for a
        connection, the start checks, and the re-checks of down servers."""
        self._up = asyncio.Event()
        self._sync()
        timeout = aiohttp.ClientTimeout(total=self.health_timeout_s)
        async with aiohttp.ClientSession(headers=self.headers, timeout=timeout, trust_env=True) as self._client:
            try:
                todo = [s for s in self.servers if not s.checked or not s.stats.up]
                await asyncio.gather(*(self.check(s) for s in todo))
                yield self
            finally:
                pending = [t for s in self.servers for t in (s.probe_task, s.check_task) if t and not t.done()]
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                for s in self.servers:
                    s.probe_task = s.check_task = None
                    s.tasks.clear()
                    s.outstanding = 0
                self._client = self._up = None

    async def acquire(self, avoid: frozenset[str] = frozenset()) -> _Server:
        """The live server with the fewest requests outstanding, preferring those whose URL is
        not in `avoid` (the ones this request failed on); waits (bounded) while none is up."""
        assert self._up is not None, "acquire() outside running()"
        if not self._up.is_set():
            try:
                async with asyncio.timeout(self.all_down_timeout_s):
                    await self._up.wait()
            except TimeoutError:
                raise AllServersDown(self.all_down_message()) from None
        live = [s for s in self.servers if s.stats.up]
        server = min([s for s in live if s.url not in avoid] or live, key=lambda s: (s.outstanding, s.last_pick))
        self._picks += 1
        server.last_pick = self._picks
        return server

    async def send(self, server: _Server, request: Awaitable[T]) -> T:
        """Await `request` on `server`, counted as outstanding there; Moved if the server is
        marked down before the reply arrives (the attempt is cancelled)."""
        server.outstanding += 1
        server.stats.sent += 1
        task = asyncio.ensure_future(request)
        server.tasks.add(task)
        try:
            reply = await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                server.stats.moved_off += 1  # cancelled by mark_down, not by our caller
                raise Moved(server.url) from None
            raise
        finally:
            server.outstanding -= 1
            server.tasks.discard(task)
        server.stats.served += 1
        server.failures_in_row = 0
        return reply

    async def failed(self, server: _Server, kind: str, why: str) -> None:
        """After a failed attempt on `server`: Moved when the server is (now) down, so that the
        request goes elsewhere; returns when the failure was the request's own (retry it)."""
        if not server_fault(kind):
            return
        if server.stats.up:
            server.failures_in_row += 1
            alive = await self.check(server)
            if alive and server.failures_in_row >= self.failures_to_down and self._others_up(server):
                self.mark_down(server, f"{server.failures_in_row} requests failed in a row, the last: {why}")
        if not server.stats.up:
            server.stats.moved_off += 1
            raise Moved(server.url)

    # -- health -----------------------------------------------------------------------------------

    async def check(self, server: _Server) -> bool:
        """Check `server` now (one check at a time per server; callers share it); marks it up or
        down; True if alive."""
        if server.check_task is None or server.check_task.done():
            server.check_task = asyncio.create_task(self._check(server))
        # Shielded: a request cancelled while waiting must not cancel the check the others share.
        return await asyncio.shield(server.check_task)

    async def _check(self, server: _Server) -> bool:
        try:
            alive, why = await self._health(server)
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            alive, why = False, f"health check: {type(e).__name__}: {e}".rstrip(": ")
        server.checked = True
        if alive and not server.stats.up:
            self.mark_up(server)
        elif not alive:
            self.mark_down(server, why)
        return alive

    async def _health(self, server: _Server) -> tuple[bool, str]:
        assert self._client is not None
        routes = [server.health_url] if server.health_url else [f"{server.root}/health", f"{server.url}/models"]
        status, url = 0, ""
        for url in routes:
            async with self._client.get(url) as resp:
                status = resp.status
                await resp.read()
            if url.endswith("/health") and status != 200 and status < 500 and len(routes) > 1:
                continue  # no health route here (404): ask the OpenAI one
            break
        if status < 500:
            server.health_url = url
            return True, ""
        return False, f"health check: GET {url}: HTTP {status}"

    def mark_down(self, server: _Server, why: str) -> None:
        if not server.stats.up:
            return
        server.stats.up, server.stats.why_down = False, why
        server.stats.went_down += 1
        log.warning("%s is down (%s)%s", server.url, why,
                    f"; its {len(server.tasks)} requests in flight move to the other servers" if server.tasks else "")
        for task in list(server.tasks):
            task.cancel()
        self._sync()
        if server.probe_task is None or server.probe_task.done():
            server.probe_task = asyncio.create_task(self._probe(server))

    def mark_up(self, server: _Server) -> None:
        server.stats.up, server.failures_in_row = True, 0
        server.stats.readmitted += 1
        log.warning("%s passed its health check: re-admitted", server.url)
        self._sync()

    async def _probe(self, server: _Server) -> None:
        """Re-check a down server with exponential back-off until it passes. The first re-check
        comes later each time the server went down, so one that passes its checks but fails
        its requests is tried less and less often."""
        first_s = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (server.stats.went_down - 1))
        await asyncio.sleep(first_s)

        async def once() -> None:
            if server.stats.up:
                return
            if not await self.check(server):
                raise _StillDown

        # No stop: the call's end cancels it; the bounded wait lives in acquire().
        await AsyncRetrying(wait=self.backoff, retry=retry_if_exception_type(_StillDown))(once)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _others_up(self, server: _Server) -> bool:
        return any(s.stats.up for s in self.servers if s is not server)

    def _sync(self) -> None:
        if self._up is None:
            return
        if any(s.stats.up for s in self.servers):
            self._up.set()
        else:
            self._up.clear()

    def all_down_message(self) -> str:
        return (f"every server is down and none came back within all_down_timeout_s={self.all_down_timeout_s:g} s "
                "(re-checked with back-off): "
                + "; ".join(f"{s.url} ({s.stats.why_down or 'down'})" for s in self.servers)
                + ". Start them again, or list servers that are up in base_url")


def describe(stats: Mapping[str, ServerStats], since: Mapping[str, tuple[int, int]] | None = None) -> str:
    """One log line: per server, requests served and moved off (since `since`, when given)."""
    parts = []
    for url, s in stats.items():
        served0, moved0 = (since or {}).get(url, (0, 0))
        state = "up" if s.up else f"down ({s.why_down})"
        parts.append(f"{url}: served {s.served - served0}, moved off {s.moved_off - moved0}, {state}")
    return "; ".join(parts)
