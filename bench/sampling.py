"""Benchmark: OpenAI-back-end sampling throughput, concurrent vs one-at-a-time, and cached re-runs.

    .venv/bin/python -m bench.sampling [--latency-s 0.2] [--concurrency 32]

Against the fake OpenAI server (tests/openai_fake_server.py, real HTTP, run in its own process
so it does not share the client's interpreter lock) with a fixed latency per request, as a
hosted API or a busy vLLM server has. Three runs, side by side in one process:
  1. one at a time (concurrency 1): what a naive client loop gets;
  2. concurrency N on ten times as many requests (the same per-request work otherwise);
  3. run 2 again on a fresh back end over the same cache: no HTTP request at all (the median
     of 5 repeats: a 40 ms measurement on a shared 2-core machine is at the mercy of the
     scheduler, and every repeat is the same fully cached work).
Both uncached runs write the persistent cache, so they pay the same per-request overhead.
The last line is JSON with concurrency_speedup (throughput ratio 2/1, target >= 20) and
cache_speedup (wall-time ratio 2/3, target >= 100).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from steps.core.backend_openai import OpenAIBackend  # noqa: E402
from steps.core.backends import SamplingParams  # noqa: E402
from steps.core.prompts import Prompt  # noqa: E402


def prompts(n: int, tag: str) -> list[Prompt]:
    return [Prompt(messages=({"role": "user", "content": f"documents : [1] item {i} is blue . question : what "
                                                         f"color is item {i} ? ({tag})"},), text="", key=f"{tag}-{i}")
            for i in range(n)]


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.openai_fake_server", "--latency-s", str(latency_s)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    port = proc.stdout.readline().strip() if proc.stdout else ""
    if not port.isdigit():
        proc.kill()
        raise RuntimeError(f"the fake server did not start (printed {port!r})")
    return proc, f"http://127.0.0.1:{port}/v1"


def timed(backend: OpenAIBackend, ps: list[Prompt], sampling: SamplingParams) -> tuple[float, int]:
    before = backend.stats.http_requests
    t0 = time.perf_counter()
    out = backend.generate(ps, sampling)
    elapsed = time.perf_counter() - t0
    assert sum(len(cs) for cs in out) == len(ps) * sampling.n, "lost completions"
    return elapsed, backend.stats.http_requests - before


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--latency-s", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--sequential-requests", type=int, default=64)
    args = ap.parse_args()
    n = 4  # samples per prompt: one request each
    sampling = SamplingParams(n=n, temperature=1.0, max_new_tokens=64, seed=0)
    seq_prompts = prompts(args.sequential_requests // n, "seq")
    par_prompts = prompts(10 * args.sequential_requests // n, "par")
    server, url = start_server(args.latency_s)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            common = {"model": "fake", "base_url": url, "progress": False, "request_timeout_s": 30.0}
            seq = OpenAIBackend(concurrency=1, cache_dir=f"{tmp}/seq", **common)
            par = OpenAIBackend(concurrency=args.concurrency, cache_dir=f"{tmp}/par", **common)
            t_seq, h_seq = timed(seq, seq_prompts, sampling)
            t_par, h_par = timed(par, par_prompts, sampling)
            repeats = [timed(OpenAIBackend(concurrency=args.concurrency, cache_dir=f"{tmp}/par", **common),
                             par_prompts, sampling) for _ in range(5)]
            t_hit = statistics.median(t for t, _ in repeats)
            h_hit = sum(h for _, h in repeats)
    finally:
        server.terminate()
        server.wait()
    rows = [("one at a time (concurrency 1)", len(seq_prompts) * n, h_seq, t_seq),
            (f"concurrency {args.concurrency}", len(par_prompts) * n, h_par, t_par),
            ("cached re-run (median of 5)", len(par_prompts) * n, h_hit, t_hit)]
    print(f"fake OpenAI server, {args.latency_s * 1000:.0f} ms per request, {n} samples per prompt\n")
    print(f"{'run':<36} {'completions':>11} {'HTTP reqs':>9} {'wall s':>8} {'compl/s':>9}")
    for name, total, http, wall in rows:
        print(f"{name:<36} {total:>11} {http:>9} {wall:>8.3f} {total / wall:>9.1f}")
    concurrency_speedup = (rows[1][1] / t_par) / (rows[0][1] / t_seq)
    cache_speedup = t_par / t_hit
    print(f"\nconcurrency speed-up {concurrency_speedup:.1f}x (target >= 20; ideal {args.concurrency}); "
          f"cache speed-up {cache_speedup:.0f}x (target >= 100); cached runs sent {h_hit} HTTP requests")
    print(json.dumps({"concurrency_speedup": round(concurrency_speedup, 2), "cache_speedup": round(cache_speedup, 1),
                      "sequential_completions_per_s": round(rows[0][1] / t_seq, 2),
                      "concurrent_completions_per_s": round(rows[1][1] / t_par, 2),
                      "cached_completions_per_s": round(rows[2][1] / t_hit, 1), "cached_http_requests": h_hit}))


if __name__ == "__main__":
    main()
