"""A stub OpenAI-compatible LLM server with vLLM's metric names, for the demo node, tests and benchmarks."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's own bucket edges, so dashboards built for vLLM read the stub the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
# Simulated KV cache size in tokens; only shapes kv_cache_usage_perc.
KV_CACHE_TOKENS = 65536
WORDS = ("the", "model", "serves", "idle", "GPUs", "and", "yields", "them", "back", "when", "a", "job",
         "lands", "on", "node", "tokens", "flow", "fast", "while", "Slurm", "sleeps")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 413: "Payload Too Large", 500: "Internal Server Error"}
MAX_BODY = 64 * 1024 * 1024


@dataclass(frozen=True)
class StubConfig:
    """How the stub behaves: where it listens, which model it names, its delays and its failures."""

    host: str = "127.0.0.1"
    port: int = 8000
    model: str = "demo"
    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    max_tokens: int = 128
    api_key: str | None = None
    error_rate: float = 0.0
    seed: int = 0


class _Request:
    """One parsed HTTP/1.1 request."""

    def __init__(self, method: str, path: str, headers: dict[str, str], body: bytes, keep_alive: bool):
        self.method, self.path, self.headers, self.body, self.keep_alive = (
            method, path, headers, body, keep_alive)


class _BadRequest(Exception):
    """The peer sent something that is not HTTP/1.1 we understand."""


class StubMetrics:
    """vLLM's metric families, in the stub's own registry."""

    def __init__(self, registry: CollectorRegistry, model: str) -> None:
        names = ["model_name", "engine"]
        lv = (model, "0")
        self.running = Gauge("vllm:num_requests_running", "Requests in model execution batches.",
                             names, registry=registry).labels(*lv)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting to be processed.",
                             names, registry=registry).labels(*lv)
        self.kv_cache = Gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                              names, registry=registry).labels(*lv)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                                     names, registry=registry).labels(*lv)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                         names, registry=registry).labels(*lv)
        self._success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                [*names, "finished_reason"], registry=registry)
        for reason in ("stop", "length", "abort"):
            self._success.labels(*lv, reason)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token.",
                              names, buckets=TTFT_BUCKETS, registry=registry).labels(*lv)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency.",
                             names, buckets=ITL_BUCKETS, registry=registry).labels(*lv)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of end to end request latency.",
                             names, buckets=REQUEST_BUCKETS, registry=registry).labels(*lv)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Time spent in the WAITING phase.",
                               names, buckets=REQUEST_BUCKETS, registry=registry).labels(*lv)
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Number of spec decoding drafts.",
                              names, registry=registry).labels(*lv)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Number of draft tokens.",
                                    names, registry=registry).labels(*lv)
        self.accepted = Counter("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens.",
                                names, registry=registry).labels(*lv)
        self._model = model

    def success(self, reason: str) -> None:
        """Count one finished request."""
        self._success.labels(self._model, "0", reason).inc()


def count_prompt_tokens(payload: dict[str, Any]) -> int:
    """Prompt tokens by the stub's rule: whitespace-separated words (token id lists count per id)."""
    def words(value: Any) -> int:
        if isinstance(value, str):
            return len(value.split())
        if isinstance(value, list):
            if value and all(isinstance(v, int) for v in value):
                return len(value)
            return sum(words(v) for v in value)
        if isinstance(value, dict):
            return words(value.get("text", value.get("content", "")))
        return 0
    if "messages" in payload:
        return sum(words(m.get("content", "")) for m in payload["messages"] if isinstance(m, dict))
    return words(payload.get("prompt", ""))


class StubApp:
    """Request handling: routing, auth, error injection, token generation with the configured delays."""

    def __init__(self, cfg: StubConfig) -> None:
        self.cfg = cfg
        self.registry = CollectorRegistry()
        self.metrics = StubMetrics(self.registry, cfg.model)
        self._rng = random.Random(cfg.seed)
        self._ids = itertools.count(1)
        self._kv_tokens = 0
        self._created = int(time.time())

    async def handle_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one keep-alive connection until the peer closes it."""
        try:
            while True:
                try:
                    req = await _read_request(reader)
                except _BadRequest as exc:
                    writer.write(_response(400, _error_body(str(exc), "BadRequestError", 400), False))
                    await writer.drain()
                    return
                if req is None:
                    return
                if not await self._dispatch(req, writer) or not req.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _dispatch(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        path = req.path.split("?", 1)[0]
        routes: dict[str, tuple[str, Callable[[_Request, asyncio.StreamWriter], Any]]] = {
            "/health": ("GET", self._health), "/ping": ("GET", self._health),
            "/metrics": ("GET", self._metrics), "/v1/models": ("GET", self._models),
            "/v1/chat/completions": ("POST", self._generate), "/v1/completions": ("POST", self._generate),
        }
        if path not in routes:
            body = _error_body(f"no route {path}", "NotFoundError", 404)
            writer.write(_response(404, body, req.keep_alive))
            return True
        method, handler = routes[path]
        if req.method != method:
            writer.write(_response(405, _error_body(f"use {method} for {path}", "BadRequestError", 405),
                                   req.keep_alive))
            return True
        # Like vLLM's --api-key: only /v1/* is guarded.
        if path.startswith("/v1/") and self.cfg.api_key is not None:
            if req.headers.get("authorization", "") != f"Bearer {self.cfg.api_key}":
                writer.write(_response(401, b'{"error": "Unauthorized"}', req.keep_alive))
                return True
        result: bool = await handler(req, writer)
        return result

    async def _health(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(_response(200, b"", req.keep_alive, "text/plain"))
        return True

    async def _metrics(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        writer.write(_response(200, generate_latest(self.registry), req.keep_alive, CONTENT_TYPE_LATEST))
        return True

    async def _models(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        card = {"id": self.cfg.model, "object": "model", "created": self._created,
                "owned_by": "exporter-watchdog", "root": self.cfg.model, "parent": None,
                "max_model_len": KV_CACHE_TOKENS}
        writer.write(_response(200, _dumps({"object": "list", "data": [card]}), req.keep_alive))
        return True

    async def _generate(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        arrived = time.monotonic()
        try:
            payload = json.loads(req.body)
            if not isinstance(payload, dict):
                raise ValueError("the body must be a JSON object")
        except ValueError as exc:
            writer.write(_response(400, _error_body(f"invalid JSON body: {exc}", "BadRequestError", 400),
                                   req.keep_alive))
            return True
        model = payload.get("model", self.cfg.model)
        if model != self.cfg.model:
            msg = f"The model `{model}` does not exist."
            writer.write(_response(404, _error_body(msg, "NotFoundError", 404), req.keep_alive))
            return True
        if self.cfg.error_rate > 0 and self._rng.random() < self.cfg.error_rate:
            writer.write(_response(500, _error_body("injected error", "InternalServerError", 500),
                                   req.keep_alive))
            return True
        chat = req.path.startswith("/v1/chat/")
        asked = payload.get("max_completion_tokens", payload.get("max_tokens"))
        n_out = self.cfg.max_tokens if not isinstance(asked, int) else max(0, min(asked, self.cfg.max_tokens))
        reason = "length" if isinstance(asked, int) and asked <= self.cfg.max_tokens else "stop"
        n_in = count_prompt_tokens(payload)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids):x}"
        words = [self._rng.choice(WORDS) + " " for _ in range(n_out)]
        self._begin(n_in + n_out)
        finished = "abort"
        try:
            self.metrics.queue.observe(0.0)
            if payload.get("stream"):
                opts = payload.get("stream_options") or {}
                usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
                await self._stream(writer, req.keep_alive, chat, rid, words, reason, n_in, usage, arrived)
            else:
                await self._sleep_until(arrived + self._token_offset(n_out - 1))
                if n_out:
                    self.metrics.ttft.observe(self.cfg.ttft_ms / 1000)
                body = self._full_body(chat, rid, "".join(words), reason, n_in, n_out)
                writer.write(_response(200, body, req.keep_alive))
                await writer.drain()
            finished = reason
        finally:
            self._end(n_in + n_out, n_in, n_out if finished != "abort" else 0, finished, arrived)
        return True

    def _token_offset(self, i: int) -> float:
        """Seconds from arrival to token i (0-based): the TTFT, then one ITL per token."""
        return (self.cfg.ttft_ms + max(i, 0) * self.cfg.itl_ms) / 1000

    async def _sleep_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _stream(self, writer: asyncio.StreamWriter, keep_alive: bool, chat: bool, rid: str,
                      words: list[str], reason: str, n_in: int, usage: bool, arrived: float) -> None:
        writer.write(_stream_head(keep_alive))
        await writer.drain()
        n_out, i, last = len(words), 0, 0.0
        while i < n_out:
            # Deadlines are absolute, so a late wake-up shortens the next gap instead of drifting.
            await self._sleep_until(arrived + self._token_offset(i))
            now = time.monotonic()
            batch = []
            # Tokens whose time has passed go out in one write; with itl 0 that is all of them.
            while i < n_out and (i == 0 or arrived + self._token_offset(i) <= now):
                final = reason if i == n_out - 1 else None
                batch.append(_sse(self._chunk(chat, rid, words[i], final, first=i == 0)))
                if i == 0:
                    self.metrics.ttft.observe(now - arrived)
                else:
                    self.metrics.itl.observe(now - last)
                last = now
                i += 1
            writer.write(_chunked(b"".join(batch)))
            await writer.drain()
        tail = []
        if usage:
            tail.append(_sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                              "created": int(time.time()), "model": self.cfg.model, "choices": [],
                              "usage": _usage(n_in, n_out)}))
        tail.append(b"data: [DONE]\n\n")
        writer.write(_chunked(b"".join(tail)) + b"0\r\n\r\n")
        await writer.drain()

    def _chunk(self, chat: bool, rid: str, word: str, finish: str | None, first: bool) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": word} if first else {"content": word}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            kind = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": word, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {"id": rid, "object": kind, "created": int(time.time()), "model": self.cfg.model,
                "choices": [choice]}

    def _full_body(self, chat: bool, rid: str, text: str, reason: str, n_in: int, n_out: int) -> bytes:
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        return _dumps({"id": rid, "object": "chat.completion" if chat else "text_completion",
                       "created": int(time.time()), "model": self.cfg.model, "choices": [choice],
                       "usage": _usage(n_in, n_out)})

    def _begin(self, tokens: int) -> None:
        self.metrics.running.inc()
        self._kv_tokens += tokens
        self.metrics.kv_cache.set(min(1.0, self._kv_tokens / KV_CACHE_TOKENS))

    def _end(self, tokens: int, n_in: int, n_out: int, reason: str, arrived: float) -> None:
        self.metrics.running.dec()
        self._kv_tokens -= tokens
        self.metrics.kv_cache.set(min(1.0, self._kv_tokens / KV_CACHE_TOKENS))
        self.metrics.prompt_tokens.inc(n_in)
        self.metrics.generation_tokens.inc(n_out)
        self.metrics.success(reason)
        self.metrics.e2e.observe(time.monotonic() - arrived)
        # A simulated one-token draft per decode step with every other draft accepted.
        self.metrics.drafts.inc(n_out)
        self.metrics.draft_tokens.inc(n_out)
        self.metrics.accepted.inc(n_out // 2)


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    line = await reader.readline()
    if not line.strip():
        # A bare CRLF between keep-alive requests is allowed; EOF ends the connection.
        if not line:
            return None
        line = await reader.readline()
        if not line:
            return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line {line[:80]!r}")
    method, path, version = parts
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readline()
        if raw in (b"\r\n", b"\n", b""):
            break
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep:
            raise _BadRequest(f"bad header line {raw[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    conn = headers.get("connection", "").lower()
    keep_alive = conn != "close" if version == "HTTP/1.1" else conn == "keep-alive"
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
            if len(body) > MAX_BODY:
                raise _BadRequest("body too large")
        return _Request(method, path, headers, bytes(body), keep_alive)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as exc:
        raise _BadRequest(f"bad Content-Length {headers.get('content-length')!r}") from exc
    if length < 0 or length > MAX_BODY:
        raise _BadRequest(f"bad Content-Length {length}")
    body_bytes = await reader.readexactly(length) if length else b""
    return _Request(method, path, headers, body_bytes, keep_alive)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error_body(message: str, kind: str, code: int) -> bytes:
    return _dumps({"object": "error", "message": message, "type": kind, "param": None, "code": code})


def _usage(n_in: int, n_out: int) -> dict[str, int]:
    return {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out}


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _response(status: int, body: bytes, keep_alive: bool, ctype: str = "application/json") -> bytes:
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n")
    return head.encode() + body


def _stream_head(keep_alive: bool) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: " + (b"keep-alive" if keep_alive else b"close")
            + b"\r\n\r\n")


async def serve(cfg: StubConfig, stop: asyncio.Event, on_ready: Callable[[int], None]) -> None:
    """Serve until stop is set; on_ready gets the bound port; open connections are dropped at stop."""
    app = StubApp(cfg)
    tasks: set[asyncio.Task[Any]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            tasks.add(task)
        try:
            await app.handle_connection(reader, writer)
        finally:
            if task is not None:
                tasks.discard(task)

    server = await asyncio.start_server(handle, cfg.host, cfg.port, backlog=4096)
    port = int(server.sockets[0].getsockname()[1])
    on_ready(port)
    try:
        await stop.wait()
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2.0)


def run_stub(cfg: StubConfig) -> None:
    """Run the stub in the foreground until SIGTERM or SIGINT."""
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # The stub holds nothing worth flushing: like vLLM without --shutdown-timeout, a stop aborts
        # in-flight requests at once. Skipping the interpreter's tear-down keeps the GPUs' hand-back fast.
        def quit_now() -> None:
            sys.stderr.flush()
            os._exit(0)

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, quit_now)

        def ready(port: int) -> None:
            logger.info("stub LLM server for model {} on http://{}:{} (ttft {} ms, itl {} ms)",
                        cfg.model, cfg.host, port, cfg.ttft_ms, cfg.itl_ms)

        await serve(cfg, stop, ready)
        logger.info("stub LLM server stopped")
    asyncio.run(main())


class StubServer:
    """The stub on a background thread with its own event loop; port 0 picks a free port."""

    def __init__(self, cfg: StubConfig) -> None:
        self._cfg = cfg
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._port: int | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; returns once the socket is bound."""
        self._thread = threading.Thread(target=self._run, name="stub-llm", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"stub server did not start within {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"stub server failed to start: {self._error}") from self._error

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()

            def ready(port: int) -> None:
                self._port = port
                self._ready.set()
            await serve(self._cfg, self._stop, ready)
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to start() on the caller's thread
            self._error = exc
            self._ready.set()

    @property
    def port(self) -> int:
        """The bound port."""
        if self._port is None:
            raise RuntimeError("stub server is not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, without /v1."""
        host = self._cfg.host if ":" not in self._cfg.host else f"[{self._cfg.host}]"
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._stop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10.0)
        self._thread = None

    def __enter__(self) -> StubServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _checked(kind: Callable[[str], float], ok: Callable[[float], bool], expected: str) -> Callable[[str], Any]:
    """An argparse type that rejects out-of-range values at parse time (exit 2, naming the option)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"invalid value {text!r} (expected {expected})")
        return value
    return parse


def add_llm_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the stub's options to a parser."""
    d = StubConfig()
    non_negative = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default {d.host})")
    parser.add_argument("--port", type=_checked(int, lambda v: 0 <= v <= 65535, "0 to 65535"), default=d.port,
                        help=f"port, 0 picks a free one (default {d.port})")
    parser.add_argument("--model", default=d.model, help=f"served model name (default {d.model})")
    parser.add_argument("--ttft-ms", type=non_negative, default=d.ttft_ms,
                        help=f"time to first token in ms (default {d.ttft_ms:g})")
    parser.add_argument("--itl-ms", type=non_negative, default=d.itl_ms,
                        help=f"delay between tokens in ms (default {d.itl_ms:g})")
    parser.add_argument("--max-tokens", type=_checked(int, lambda v: v >= 0, "an integer >= 0"),
                        default=d.max_tokens, help=f"output length cap and default (default {d.max_tokens})")
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $VLLM_API_KEY, as vLLM)")
    parser.add_argument("--error-rate", type=_checked(float, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
                        default=d.error_rate,
                        help="fraction of generation requests answered with HTTP 500 (default 0)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed for generated text and errors")


def stub_config_from_args(args: argparse.Namespace) -> StubConfig:
    """Build a StubConfig from parsed options; ValueError names a bad option and its value."""
    checks = [("--port", args.port, 0 <= args.port <= 65535),
              ("--ttft-ms", args.ttft_ms, args.ttft_ms >= 0),
              ("--itl-ms", args.itl_ms, args.itl_ms >= 0),
              ("--max-tokens", args.max_tokens, args.max_tokens >= 0),
              ("--error-rate", args.error_rate, 0.0 <= args.error_rate <= 1.0)]
    for name, value, ok in checks:
        if not ok:
            raise ValueError(f"{name}: invalid value {value!r}")
    return StubConfig(host=args.host, port=args.port, model=args.model, ttft_ms=args.ttft_ms,
                      itl_ms=args.itl_ms, max_tokens=args.max_tokens,
                      api_key=args.api_key or os.environ.get("VLLM_API_KEY") or None,
                      error_rate=args.error_rate, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m exporter_watchdog.demo.llm`."""
    parser = argparse.ArgumentParser(prog="exporter-watchdog demo llm",
                                     description="Run the stub OpenAI-compatible LLM server.")
    add_llm_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = stub_config_from_args(args)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run_stub(cfg)
    except OSError as exc:
        print(f"exporter-watchdog demo llm: cannot listen on {cfg.host}:{cfg.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
