"""Is `exporter-watchdog bench` the bottleneck? Its requests/s next to a minimal raw httpx loop, same stub, same run.

Starts the demo stub server as a subprocess (no first-token delay, a small inter-token delay), then runs,
interleaved, bare httpx loops (stream the response, discard it; once with one shared client, once with a
client per worker) and the bench runner (parses every SSE chunk, times every token) at the same concurrency
with the same request body, and prints the best requests/s of each and the ratios. Target: >= 0.9 of the
faster raw loop.

    .venv/bin/python benchmarks/bench_client_overhead.py [--concurrency 64] [--requests 2000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from exporter_watchdog.bench.dataset import Prompt, random_prompts  # noqa: E402
from exporter_watchdog.bench.runner import LoadSpec, chat_payload, make_client, run_load  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stub(port: int, itl_ms: float, max_tokens: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter_watchdog.demo.llm", "--port", str(port), "--ttft-ms", "0",
         "--itl-ms", str(itl_ms), "--max-tokens", str(max_tokens)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("the stub server did not come up")


async def raw_loop(spec: LoadSpec, body: bytes, n: int, concurrency: int, per_worker: bool) -> float:
    """Requests/s of the least a client can do: stream each response and throw it away.

    per_worker=False shares one httpx pool among the workers (the obvious way to write it);
    per_worker=True gives each worker its own one-connection client, as the bench runner does.
    """
    url = f"{spec.base_url}/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    ctx = httpx.create_ssl_context()
    shared = None if per_worker else make_client(spec, concurrency, ctx)
    clients = [make_client(spec, 1, ctx) for _ in range(concurrency)] if per_worker else []
    remaining = iter(range(n))
    done = 0

    async def worker(k: int) -> None:
        nonlocal done
        client = clients[k] if per_worker else shared
        assert client is not None
        for _ in remaining:
            async with client.stream("POST", url, content=body, headers=headers) as r:
                async for _chunk in r.aiter_raw():
                    pass
                done += r.status_code == 200
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    elapsed = time.perf_counter() - t0
    for c in [*clients, *([shared] if shared else [])]:
        await c.aclose()
    return done / elapsed


async def bench_loop(spec: LoadSpec, prompts: list[Prompt]) -> float:
    """Requests/s the bench runner achieves, with all its per-token bookkeeping."""
    outcome = await run_load(spec, prompts)
    ok = sum(r.success for r in outcome.results)
    return ok / outcome.duration


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--itl-ms", type=float, default=1.0)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    a = parser.parse_args()
    port = free_port()
    stub = start_stub(port, a.itl_ms, a.output_len)
    try:
        spec = LoadSpec(base_url=f"http://127.0.0.1:{port}", model="demo", max_concurrency=a.concurrency)
        prompt = random_prompts(1, a.input_len, a.output_len, seed=1)[0]
        body = json.dumps(chat_payload(spec, prompt)).encode()
        # Both clients get their requests ready-made: the raw loop one body, the runner its prompts.
        prompts = random_prompts(a.requests, a.input_len, a.output_len, seed=1)
        asyncio.run(raw_loop(spec, body, min(200, a.requests), a.concurrency, True))  # warm both processes up
        runs: dict[str, list[tuple[float, float]]] = {"shared": [], "per_worker": [], "bench": []}

        def timed(kind: str, coro: Coroutine[Any, Any, float]) -> float:
            cpu = time.process_time()
            rps = asyncio.run(coro)
            # Client CPU per request: steadier than req/s on a machine others are using too.
            runs[kind].append((rps, (time.process_time() - cpu) / a.requests * 1000))
            return rps

        for i in range(a.rounds):
            s = timed("shared", raw_loop(spec, body, a.requests, a.concurrency, False))
            p = timed("per_worker", raw_loop(spec, body, a.requests, a.concurrency, True))
            b = timed("bench", bench_loop(spec, prompts))
            print(f"round {i + 1}: raw httpx shared pool {s:7.1f}   raw httpx client per worker {p:7.1f}   "
                  f"bench runner {b:7.1f} req/s")
        print(f"stub: ttft 0 ms, itl {a.itl_ms:g} ms, {a.output_len} tokens; concurrency {a.concurrency}, "
              f"{a.requests} requests per run, {a.rounds} rounds (interleaved), {os.cpu_count()} CPUs")
        labels = {"shared": "raw httpx loop, one shared pool", "per_worker": "raw httpx loop, client per worker",
                  "bench": "bench runner"}
        for kind, label in labels.items():
            fastest = max(r for r, _ in runs[kind])
            cpu = statistics.median(c for _, c in runs[kind])
            print(f"{label:<34} best {fastest:8.1f} req/s   median client CPU {cpu:6.3f} ms/request")
        top = {k: max(r for r, _ in v) for k, v in runs.items()}
        print(f"ratio bench / raw (client per worker): {top['bench'] / top['per_worker']:6.3f}  (target >= 0.9)")
        print(f"ratio bench / raw (shared pool):       {top['bench'] / top['shared']:6.3f}")
    finally:
        os.killpg(stub.pid, signal.SIGTERM)
        stub.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
