"""The load generator: streaming chat completions with Poisson arrivals and a concurrency limit."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from exporter_watchdog.bench.dataset import Prompt


@dataclass
class RequestResult:
    """What one request measured; times in seconds, start relative to the run's start."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start: float = 0.0
    generated_text: str = ""
    error: str = ""
    reason: str = ""


@dataclass(frozen=True)
class LoadSpec:
    """How to send: where, which model, how fast and how many at once."""

    base_url: str
    model: str
    api_key: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    timeout: float = 600.0
    ignore_eos: bool = False
    seed: int = 0


@dataclass
class RunOutcome:
    """All requests of one run, in prompt order, with the run's wall time and peak concurrency."""

    results: list[RequestResult]
    duration: float
    max_concurrent_requests: int


class Tracker:
    """Requests in flight and their peak."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        self.now -= 1


def _fail_fast_without_sniffio() -> None:
    """Make httpcore's per-request `import sniffio` fail at once where sniffio is not installed.

    httpcore tries that import whenever it sets up a lock; newer anyio no longer pulls sniffio in, and
    every failed try scans sys.path. A None entry in sys.modules fails the same way without the scan.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def make_client(spec: LoadSpec, connections: int, ssl_context: ssl.SSLContext | None = None) -> httpx.AsyncClient:
    """An async client whose pool holds `connections` keep-alive connections and never times out waiting."""
    _fail_fast_without_sniffio()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(spec.timeout, connect=min(spec.timeout, 30.0), pool=None)
    headers = {"Content-Type": "application/json"}
    if spec.api_key:
        headers["Authorization"] = f"Bearer {spec.api_key}"
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers,
                             verify=ssl_context if ssl_context is not None else True)


class ClientSlots:
    """Concurrency slots, each with its own one-connection client.

    httpcore's pool scans every connection for every request event, which costs more CPU than the
    requests themselves at high concurrency; a client per slot keeps that scan to one connection.
    Taking a slot also bounds the requests in flight, like a semaphore.
    """

    def __init__(self, spec: LoadSpec, limit: int) -> None:
        self._spec, self._limit = spec, limit
        self._free: asyncio.LifoQueue[httpx.AsyncClient] = asyncio.LifoQueue()
        self._all: list[httpx.AsyncClient] = []
        # One TLS context for all: httpx builds a new one (tens of ms) for every client otherwise.
        self._ssl = httpx.create_ssl_context()

    async def acquire(self) -> httpx.AsyncClient:
        """A free client; a new one while fewer than the limit exist, else wait for one."""
        if self._free.empty() and len(self._all) < self._limit:
            client = make_client(self._spec, 1, self._ssl)
            self._all.append(client)
            return client
        return await self._free.get()

    async def warm_up(self, url: str) -> None:
        """Open every slot's connection with a GET to url, so no measured request pays for a TCP handshake."""
        async def one() -> None:
            client = make_client(self._spec, 1, self._ssl)
            self._all.append(client)
            try:
                await client.get(url, timeout=min(self._spec.timeout, 10.0))
            except httpx.HTTPError:
                pass  # the measured requests will report what is wrong
            self._free.put_nowait(client)
        await asyncio.gather(*(one() for _ in range(self._limit - len(self._all))))

    def release(self, client: httpx.AsyncClient) -> None:
        """Hand a client back; the most recently used goes out first, its connection still warm."""
        self._free.put_nowait(client)

    async def aclose(self) -> None:
        """Close every client."""
        await asyncio.gather(*(c.aclose() for c in self._all), return_exceptions=True)


def chat_payload(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    """The request body, as vLLM's benchmark sends it for chat."""
    payload: dict[str, Any] = {
        "model": spec.model, "messages": list(prompt.messages), "max_tokens": prompt.output_len,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def send_chat(client: httpx.AsyncClient, url: str, body: bytes) -> RequestResult:
    """POST one streaming chat completion body to url and time its tokens; errors become a failed result."""
    res = RequestResult()
    stamps: list[float] = []
    payloads: list[bytes] = []
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, content=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                return _failed(res, f"HTTP {r.status_code}", f"HTTP {r.status_code}: {text[:300]}")
            identity = r.headers.get("content-encoding", "identity") == "identity"
            buf = b""
            async for data in r.aiter_raw() if identity else r.aiter_bytes():
                # The hot path only splits events and takes their time; decoding waits for the end.
                now = time.perf_counter()
                buf = buf + data if buf else data
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                events = buf.split(b"\n\n")
                buf = events.pop()
                for event in events:
                    for line in event.split(b"\n") if b"\n" in event else (event,):
                        if line.startswith(b"data:"):
                            payload = line[5:].strip()
                            if payload != b"[DONE]":
                                payloads.append(payload)
                                stamps.append(now)
            res.latency = time.perf_counter() - start
    except httpx.TimeoutException as exc:
        return _failed(res, "timeout", f"timeout after {time.perf_counter() - start:.1f} s: {exc!r}")
    except httpx.ConnectError as exc:
        return _failed(res, "connection error", f"cannot connect: {exc}")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        return _failed(res, "connection error", f"connection broken: {exc!r}")
    except httpx.HTTPError as exc:
        return _failed(res, "http error", f"{type(exc).__name__}: {exc}")
    return decode_stream(res, start, stamps, payloads)


def decode_stream(res: RequestResult, start: float, stamps: list[float], payloads: list[bytes]) -> RequestResult:
    """Fill res from the stream's data payloads and their arrival times (perf_counter seconds)."""
    try:
        # One parse for the whole stream: per-call overhead would cost more than the parsing itself.
        objs = json.loads(b"[" + b",".join(payloads) + b"]")
        if len(objs) != len(payloads):
            raise ValueError("chunks do not match data lines")
    except ValueError:
        for p in payloads:
            try:
                json.loads(p)
            except ValueError as exc:
                return _failed(res, "bad response", f"unreadable stream chunk {p[:100]!r}: {exc}")
        return _failed(res, "bad response", "unreadable stream")
    usage: Any = None
    parts: list[str] = []
    last = start
    try:
        for now, obj in zip(stamps, objs, strict=True):
            if "error" in obj:
                err = obj["error"]
                msg = err.get("message", err) if isinstance(err, dict) else err
                return _failed(res, "stream error", f"error in stream: {msg}")
            if obj.get("usage"):
                usage = obj["usage"]
            text = _token_text(obj)
            if text:
                if parts:
                    res.itl.append(now - last)
                else:
                    res.ttft = now - start
                last = now
                parts.append(text)
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        return _failed(res, "bad response", f"unexpected stream chunk: {type(exc).__name__}: {exc}")
    if not parts:
        return _failed(res, "empty response", "the stream ended without any token")
    res.success = True
    res.generated_text = "".join(parts)
    usage = usage if isinstance(usage, dict) else {}
    completion = usage.get("completion_tokens")
    res.output_tokens = completion if isinstance(completion, int) else len(parts)
    prompt_tokens = usage.get("prompt_tokens")
    if isinstance(prompt_tokens, int):
        res.prompt_len = prompt_tokens
    return res


def _token_text(obj: dict[str, Any]) -> str:
    choices = obj.get("choices")
    if not choices:
        return ""
    choice = choices[0]
    delta = choice.get("delta")
    if delta:
        # Reasoning models stream their thinking first; those are generated tokens too.
        return str(delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning") or "")
    return str(choice.get("text") or "")


def prompt_words(prompt: Prompt) -> int:
    """The prompt's length when the server reports none: the dataset's, else its whitespace words."""
    if prompt.input_len is not None:
        return prompt.input_len
    return sum(len(str(m.get("content", "")).split()) for m in prompt.messages)


def _failed(res: RequestResult, reason: str, error: str) -> RequestResult:
    res.success = False
    res.reason = reason
    res.error = error
    return res


async def arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> AsyncIterator[int]:
    """Yield request indices at gamma-distributed intervals (burstiness 1 = Poisson); all at once for inf."""
    begin = time.perf_counter()
    due = 0.0
    for i in range(n):
        delay = begin + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield i
        if math.isfinite(rate):
            # Absolute due times: a late wake-up does not push every later arrival back.
            due += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))


async def run_load(spec: LoadSpec, prompts: Sequence[Prompt],
                   on_done: Callable[[RequestResult], None] | None = None, warm_up: bool = True) -> RunOutcome:
    """Send every prompt and collect the results; never raises for a failed request."""
    n = len(prompts)
    slots = ClientSlots(spec, max(1, min(spec.max_concurrency or n, n)))
    tracker = Tracker()
    rng = random.Random(spec.seed)
    url = f"{spec.base_url}/v1/chat/completions"
    # Bodies are encoded and connections opened before the clock starts: it measures the server, not set-up.
    bodies = [json.dumps(chat_payload(spec, p)).encode() for p in prompts]
    t0 = 0.0

    async def one(prompt: Prompt, body: bytes) -> RequestResult:
        client = await slots.acquire()
        tracker.enter()
        began = time.perf_counter()
        try:
            res = await send_chat(client, url, body)
        except Exception as exc:  # noqa: BLE001 - a bug in one request must not end the run
            res = _failed(RequestResult(), "client error", f"{type(exc).__name__}: {exc}")
        finally:
            tracker.leave()
            slots.release(client)
        res.start = began - t0
        if not res.prompt_len:
            res.prompt_len = prompt_words(prompt)
        if on_done is not None:
            on_done(res)
        return res

    try:
        if warm_up:
            await slots.warm_up(f"{spec.base_url}/v1/models")
        t0 = time.perf_counter()
        tasks = []
        async for i in arrivals(n, spec.request_rate, spec.burstiness, rng):
            tasks.append(asyncio.create_task(one(prompts[i], bodies[i])))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    finally:
        await slots.aclose()
    return RunOutcome(results, duration, tracker.peak)
