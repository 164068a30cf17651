"""A scripted server that speaks the OpenAI HTTP protocol: a test double for hosted APIs.

    with FakeOpenAIServer(latency_s=0.2, faults={0: "429", 3: "stall"}) as server:
        backend = OpenAIBackend(model="fake", base_url=server.base_url)

Real HTTP on 127.0.0.1 (a free port), one thread per connection, keep-alive as real servers
do, so the client under test goes through its whole network stack. Routes: GET /v1/models,
POST /v1/chat/completions and /v1/completions.

Faults are scripted by the arrival number of a POST (0-based, counted over both completion
routes): `faults={n: kind}` or a callable `(n, body) -> kind | None`. Kinds:
  "429"        rate limited, with `retry-after-ms` / `retry-after` headers
  "500"        server error with a JSON error body
  "stall"      no reply for `stall_s` (longer than the client's timeout), then the socket closes
  "malformed"  200 with a truncated JSON body
  "drop"       the connection closes without any reply

Replies are a deterministic function of the request: a generation is
`<think> ... seed S ... </think> the answer is W .`, one "token" per word, cut at max_tokens
(finish_reason "length"); with `reasoning_field=True` the trace comes back in
`message.reasoning_content` as DeepSeek-R1 / vLLM reasoning parsers send it. A request whose
messages hold the LLM judge's "## Response to judge" section gets a JSON verdict from
`judge_rule` (or from `judge_fn`, a hook for scripted judge replies).

Run alone: `python -m tests.openai_fake_server --latency-s 0.2 --fault 3:500` prints the port,
then serves. `FakeServerProcess` runs it so, in a process of its own, for tests that kill a
server as a crash would (SIGKILL: its connections reset, new ones refused), which a server in the
test's own process cannot do: its keep-alive handler threads would go on serving.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from collections import Counter
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("429", "500", "stall", "malformed", "drop")
JUDGE_MARKER = "## Response to judge"
_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset("a an the is are was were it of in on at to and or with its has have for".split())

FaultScript = Mapping[int, str] | Callable[[int, dict[str, Any]], str | None]


def _words(text: str) -> set[str]:
    return {w for w in _WORD.findall(text.lower()) if w not in _STOP}


def _section(text: str, header: str) -> str:
    """The text under a `## header` line of the judge prompt, up to the next `## ` header."""
    m = re.search(rf"^## {re.escape(header)}[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    return m.group(1).strip() if m else ""


def judge_rule(prompt: str) -> dict[str, Any]:
    """A verdict by rule: correct iff the response states an answer ("answer is") and every word
    in it occurs in the documents, history or question; helpful iff correct and it says more
    than one sentence."""
    response = _section(prompt, "Response to judge")
    context = " ".join(_section(prompt, h) for h in ("Documents", "Dialogue history", "Question"))
    unknown = sorted(_words(response) - _words(context) - {"answer"})
    correct = int("answer is" in response.lower() and not unknown)
    sentences = [s for s in re.split(r"[.!?]", response) if s.strip()]
    helpful = int(correct and len(sentences) >= 2)
    why = f"unsupported words {unknown[:5]}" if unknown else "every word is in the context"
    return {"rationale": f"{why}; {len(sentences)} sentence(s)", "correct": correct, "helpful": helpful}


class FakeOpenAIServer:
    def __init__(self, model: str = "fake", latency_s: float = 0.0, faults: FaultScript | None = None,
                 stall_s: float = 30.0, retry_after_s: float = 0.05, reasoning_field: bool = False,
                 judge_fn: Callable[[int, dict[str, Any]], str] | None = None, port: int = 0,
                 usage: bool = True):
        self.model, self.latency_s, self.stall_s = model, latency_s, stall_s
        self.faults: FaultScript = faults or {}
        self.retry_after_s, self.reasoning_field, self.judge_fn = retry_after_s, reasoning_field, judge_fn
        self.counts: Counter[str] = Counter()  # by route and by fault kind ("fault:429", ...)
        self.bodies: list[dict[str, Any]] = []  # every POST body, in arrival order
        self.usage = usage  # False: replies carry no `usage`, as some servers send them
        self.authorizations: set[str] = set()  # every Authorization header seen
        self.in_flight = self.max_in_flight = 0  # concurrent POSTs being handled, and the peak
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self), bind_and_activate=False)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 256  # the default backlog (5) refuses bursts of 32 connects
        self._httpd.allow_reuse_address = True
        self._httpd.server_bind()
        self._httpd.server_activate()
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def posts(self) -> int:
        """POST requests received (every attempt, faulted ones included)."""
        with self._lock:
            return len(self.bodies)

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases stalled handlers
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what a request gets ------------------------------------------------------------------

    def _admit(self, path: str, body: dict[str, Any]) -> tuple[int, str | None]:
        with self._lock:
            n = len(self.bodies)
            self.bodies.append(body)
            self.counts[path] += 1
            fault = self.faults(n, body) if callable(self.faults) else self.faults.get(n)
            if fault is not None:
                if fault not in FAULT_KINDS:
                    raise ValueError(f"fault script: request {n}: unknown fault {fault!r}; known: {FAULT_KINDS}")
                self.counts[f"fault:{fault}"] += 1
        return n, fault

    def reply(self, n: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages") or []
        prompt = body.get("prompt") if path.endswith("/completions") and "messages" not in body else None
        last = str(prompt if prompt is not None else (messages[-1].get("content", "") if messages else ""))
        if JUDGE_MARKER in last:
            content = (self.judge_fn(n, body) if self.judge_fn else self._judge_text(last, body))
            thinking = None
        else:
            thinking, content = self._generation(last, body)
        words = (thinking.split() if thinking else []) + content.split()
        budget = int(body.get("max_tokens") or body.get("max_completion_tokens") or 10_000)
        finish = "length" if len(words) > budget else "stop"
        if finish == "length":  # cut where the budget ends, thinking first, as a model would
            t_len = len(thinking.split()) if thinking else 0
            thinking = " ".join(words[:min(t_len, budget)]) if thinking else None
            content = " ".join(words[t_len:budget]) if budget > t_len else ""
        usage = {"prompt_tokens": len(last.split()), "completion_tokens": min(len(words), budget)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if prompt is not None:
            text = f"<think> {thinking} </think> {content}" if thinking and finish == "stop" else content
            choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": finish}
            obj = "text_completion"
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking is not None and self.reasoning_field:
                message["reasoning_content"] = thinking
            elif thinking is not None:
                message["content"] = (f"<think> {thinking} </think> {content}" if finish == "stop"
                                      else f"<think> {thinking} {content}".rstrip())
            choice = {"index": 0, "message": message, "finish_reason": finish}
            obj = "chat.completion"
        out = {"id": f"fake-{n}", "object": obj, "created": int(time.time()), "model": body.get("model", self.model),
               "choices": [choice], "usage": usage}
        if not self.usage:
            del out["usage"]
        return out

    def _generation(self, prompt: str, body: dict[str, Any]) -> tuple[str, str]:
        question = prompt.split("question :")[-1].split(" reply with")[0].strip() or prompt[-60:]
        seed = body.get("seed", 0)
        vocab = sorted(_words(prompt)) or ["x"]
        answer = vocab[int(seed or 0) % len(vocab)]
        thinking = f"the question is {question} . sample seed {seed} temperature {body.get('temperature')} ."
        return thinking, f"the answer is {answer} ."

    def _judge_text(self, prompt: str, body: dict[str, Any]) -> str:
        verdict = json.dumps(judge_rule(prompt))
        if body.get("response_format"):
            return verdict
        return f"Here is my verdict.\n```json\n{verdict}\n```"  # prose around it, as chat models do


def _handler_for(server: FakeOpenAIServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers speak it

        def setup(self) -> None:
            super().setup()
            # Headers and body go out in two writes; with Nagle's algorithm the second waits
            # for the client's delayed ACK (~40 ms), which real servers avoid the same way.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
            pass

        def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                self.close_connection = True

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                with server._lock:
                    server.counts[self.path] += 1
                data = {"object": "list", "data": [{"id": server.model, "object": "model", "owned_by": "fake"}]}
                self._send(200, json.dumps(data).encode())
            else:
                self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.rstrip("/")
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path not in ("/v1/chat/completions", "/v1/completions"):
                self._send(404, json.dumps({"error": {"message": f"no route {path}"}}).encode())
                return
            try:
                body = json.loads(raw)
            except json.JSONDecodeError as e:
                self._send(400, json.dumps({"error": {"message": f"invalid JSON body: {e}"}}).encode())
                return
            with server._lock:
                server.authorizations.add(self.headers.get("Authorization", ""))
            n, fault = server._admit(path, body)
            with server._lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                self._answer(n, path, body, fault)
            finally:
                with server._lock:
                    server.in_flight -= 1

        def _answer(self, n: int, path: str, body: dict[str, Any], fault: str | None) -> None:
            if fault == "stall":
                server._stopping.wait(server.stall_s)
                self.close_connection = True
                return
            if fault == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if server.latency_s:
                time.sleep(server.latency_s)
            if fault == "429":
                retry = {"retry-after-ms": str(int(server.retry_after_s * 1000)),
                         "retry-after": str(max(0, round(server.retry_after_s)))}
                error = {"error": {"message": "rate limited", "type": "rate_limit"}}
                self._send(429, json.dumps(error).encode(), retry)
            elif fault == "500":
                self._send(500, json.dumps({"error": {"message": "internal error", "type": "server_error"}}).encode())
            elif fault == "malformed":
                self._send(200, b'{"id": "fake", "object": "chat.completion", "choices": [{"index": 0, "mess')
            else:
                self._send(200, json.dumps(server.reply(n, path, body)).encode())

    return Handler


class FakeServerProcess:
    """The fake server in a process of its own (module docstring), started on `port` (0: a free
    one); `kill()` is SIGKILL. Faults are scripted by arrival number, as in the class above."""

    def __init__(self, port: int = 0, latency_s: float = 0.0, model: str = "fake",
                 faults: Mapping[int, str] | None = None):
        root = Path(__file__).resolve().parents[1]
        cmd = [sys.executable, "-m", "tests.openai_fake_server", "--port", str(port), "--latency-s", str(latency_s),
               "--model", model, *(a for n, kind in (faults or {}).items() for a in ("--fault", f"{n}:{kind}"))]
        env = {**os.environ, "PYTHONPATH": str(root)}
        self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.strip().isdigit():
            self.proc.kill()
            raise RuntimeError(f"the fake server did not start ({cmd}): {line!r}")
        self.port = int(line)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> FakeServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description="serve the fake OpenAI API until interrupted")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency-s", type=float, default=0.0)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--reasoning-field", action="store_true")
    ap.add_argument("--fault", action="append", default=[], metavar="N:KIND",
                    help=f"POST number N (0-based) gets fault KIND, one of {FAULT_KINDS}; repeatable")
    args = ap.parse_args()
    faults = {int(n): kind for n, kind in (f.split(":", 1) for f in args.fault)}
    server = FakeOpenAIServer(model=args.model, latency_s=args.latency_s, reasoning_field=args.reasoning_field,
                              port=args.port, faults=faults)
    print(server.port, flush=True)
    try:
        server._httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
