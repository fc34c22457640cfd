"""The load generator: streaming chat completions with Poisson arrivals and a concurrency limit."""

from __future__ import annotations

import asyncio
import json
import math
import random
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


def make_client(spec: LoadSpec, connections: int) -> httpx.AsyncClient:
    """An async client with a pool as large as the concurrency, so no request waits for a connection."""
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    timeout = httpx.Timeout(spec.timeout, connect=min(spec.timeout, 30.0), pool=None)
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    return httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers)


def chat_payload(spec: LoadSpec, prompt: Prompt) -> dict[str, Any]:
    """The request body, as vLLM's benchmark sends it for chat."""
    payload: dict[str, Any] = {
        "model": spec.model, "messages": list(prompt.messages), "max_tokens": prompt.output_len,
        "stream": True, "stream_options": {"include_usage": True},
    }
    if spec.ignore_eos:
        payload["ignore_eos"] = True
    return payload


async def send_chat(client: httpx.AsyncClient, spec: LoadSpec, prompt: Prompt) -> RequestResult:
    """Send one streaming chat completion and time its tokens; errors become a failed result."""
    res = RequestResult()
    url = f"{spec.base_url}/v1/chat/completions"
    body = json.dumps(chat_payload(spec, prompt)).encode()
    usage: dict[str, Any] = {}
    parts: list[str] = []
    chunks = 0
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, content=body, headers={"Content-Type": "application/json"}) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                return _failed(res, f"HTTP {r.status_code}", f"HTTP {r.status_code}: {text[:300]}")
            buf = b""
            async for data in r.aiter_bytes():
                now = time.perf_counter()
                buf += data
                if b"\r" in buf:
                    buf = buf.replace(b"\r\n", b"\n")
                while True:
                    cut = buf.find(b"\n\n")
                    if cut < 0:
                        break
                    event, buf = buf[:cut], buf[cut + 2:]
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data_line = line[5:].strip()
                        if data_line == b"[DONE]":
                            continue
                        obj = json.loads(data_line)
                        if "error" in obj:
                            err = obj["error"]
                            msg = err.get("message", err) if isinstance(err, dict) else err
                            return _failed(res, "stream error", f"error in stream: {msg}")
                        if obj.get("usage"):
                            usage = obj["usage"]
                        text = _token_text(obj)
                        if text:
                            if chunks == 0:
                                res.ttft = now - start
                            else:
                                res.itl.append(now - last)
                            last = now
                            chunks += 1
                            parts.append(text)
            res.latency = time.perf_counter() - start
    except httpx.TimeoutException as exc:
        return _failed(res, "timeout", f"timeout after {time.perf_counter() - start:.1f} s: {exc!r}")
    except httpx.ConnectError as exc:
        return _failed(res, "connection error", f"cannot connect: {exc}")
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        return _failed(res, "connection error", f"connection broken: {exc!r}")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError) as exc:
        return _failed(res, "bad response", f"unreadable stream chunk: {exc}")
    except httpx.HTTPError as exc:
        return _failed(res, "http error", f"{type(exc).__name__}: {exc}")
    if chunks == 0:
        return _failed(res, "empty response", "the stream ended without any token")
    res.success = True
    res.generated_text = "".join(parts)
    completion = usage.get("completion_tokens")
    res.output_tokens = completion if isinstance(completion, int) else chunks
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
                   on_done: Callable[[RequestResult], None] | None = None) -> RunOutcome:
    """Send every prompt and collect the results; never raises for a failed request."""
    n = len(prompts)
    limit = spec.max_concurrency or n
    sem = asyncio.Semaphore(limit)
    tracker = Tracker()
    rng = random.Random(spec.seed)
    async with make_client(spec, max(1, min(limit, n))) as client:
        t0 = time.perf_counter()

        async def one(prompt: Prompt) -> RequestResult:
            async with sem:
                tracker.enter()
                began = time.perf_counter()
                try:
                    res = await send_chat(client, spec, prompt)
                except Exception as exc:  # noqa: BLE001 - a bug in one request must not end the run
                    res = _failed(RequestResult(), "client error", f"{type(exc).__name__}: {exc}")
                finally:
                    tracker.leave()
            res.start = began - t0
            if not res.prompt_len:
                res.prompt_len = prompt_words(prompt)
            if on_done is not None:
                on_done(res)
            return res

        tasks = []
        async for i in arrivals(n, spec.request_rate, spec.burstiness, rng):
            tasks.append(asyncio.create_task(one(prompts[i])))
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - t0
    return RunOutcome(results, duration, tracker.peak)
