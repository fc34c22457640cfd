"""The demo stub LLM server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter_watchdog.demo.llm import StubServer
from tests.support.waiting import free_port

REPO = Path(__file__).resolve().parents[2]



def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order."""
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def chat(prompt: str, **kw: Any) -> dict[str, Any]:
    return {"model": "demo", "messages": [{"role": "user", "content": prompt}], **kw}


def test_health_ping_and_models(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(model="my-model")
    assert httpx.get(f"{stub.url}/health").status_code == 200
    assert httpx.get(f"{stub.url}/ping").status_code == 200
    models = httpx.get(f"{stub.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["my-model"]
    assert models["object"] == "list"


def test_streaming_chat_chunks_and_usage(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory()
    body = chat("one two three four five", stream=True, max_tokens=7,
                stream_options={"include_usage": True})
    r = httpx.post(f"{stub.url}/v1/chat/completions", json=body)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    tokens = [c for c in chunks if c["choices"]]
    assert len(tokens) == 7
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "demo" for c in chunks)
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["delta"]["content"] for c in tokens)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 6 + ["length"]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert len({c["id"] for c in chunks}) == 1


def test_streaming_without_usage_option_sends_no_usage(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory()
    r = httpx.post(f"{stub.url}/v1/chat/completions", json=chat("hi", stream=True, max_tokens=3))
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    assert len(chunks) == 3
    assert all("usage" not in c for c in chunks)


def test_streaming_completions(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory()
    body = {"model": "demo", "prompt": "a b c", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events(httpx.post(f"{stub.url}/v1/completions", json=body).text)
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert len(texts) == 4 and all(texts)
    assert chunks[0]["object"] == "text_completion"
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_non_streaming_usage_and_caps(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(max_tokens=16)
    r = httpx.post(f"{stub.url}/v1/chat/completions", json=chat("x y", max_completion_tokens=5)).json()
    assert r["object"] == "chat.completion"
    assert r["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert len(r["choices"][0]["message"]["content"].split()) == 5
    assert r["choices"][0]["finish_reason"] == "length"
    # Above the cap, and with no limit at all: the default length, finished by "stop".
    for extra in ({"max_tokens": 1000}, {}):
        r = httpx.post(f"{stub.url}/v1/chat/completions", json=chat("x", **extra)).json()
        assert r["usage"]["completion_tokens"] == 16
        assert r["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{stub.url}/v1/completions",
                   json={"model": "demo", "prompt": ["a b", "c"], "max_tokens": 3}).json()
    assert r["object"] == "text_completion"
    assert r["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert len(r["choices"][0]["text"].split()) == 3


def test_delays_roughly_honoured(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(ttft_ms=200.0, itl_ms=20.0)
    stamps: list[float] = []
    with httpx.Client(timeout=30) as client:
        start = time.perf_counter()
        body = chat("hello", stream=True, max_tokens=11)
        with client.stream("POST", f"{stub.url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    stamps.append(time.perf_counter())
        non_stream_start = time.perf_counter()
        client.post(f"{stub.url}/v1/chat/completions", json=chat("hello", max_tokens=11))
        non_stream = time.perf_counter() - non_stream_start
    assert len(stamps) == 11
    ttft = stamps[0] - start
    mean_itl = (stamps[-1] - stamps[0]) / 10
    # Lower bounds are firm (the stub never runs early); upper bounds leave room for a busy machine.
    assert 0.195 <= ttft < 1.0
    assert 0.015 <= mean_itl < 0.1
    assert 0.39 <= non_stream < 2.0


def test_api_key(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{stub.url}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json() == {"error": "Unauthorized"}
        r = httpx.post(f"{stub.url}/v1/chat/completions", json=chat("x"), headers=headers)
        assert r.status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert httpx.get(f"{stub.url}/v1/models", headers=good).status_code == 200
    assert httpx.post(f"{stub.url}/v1/chat/completions", json=chat("x", max_tokens=2),
                      headers=good).status_code == 200
    # Like vLLM, only /v1/* is guarded.
    assert httpx.get(f"{stub.url}/health").status_code == 200
    assert httpx.get(f"{stub.url}/metrics").status_code == 200


def test_error_injection(stub_factory: Callable[..., StubServer]) -> None:
    always = stub_factory(error_rate=1.0)
    r = httpx.post(f"{always.url}/v1/chat/completions", json=chat("x", max_tokens=2))
    assert r.status_code == 500
    assert r.json()["code"] == 500 and r.json()["message"]
    half = stub_factory(error_rate=0.5, seed=3)
    with httpx.Client() as client:
        codes = [client.post(f"{half.url}/v1/chat/completions", json=chat("x", max_tokens=1)).status_code
                 for _ in range(60)]
    assert set(codes) == {200, 500}
    assert 10 <= codes.count(500) <= 50
    ok = metric_samples(half.url)[("vllm:request_success_total",
                                   (("engine", "0"), ("finished_reason", "length"), ("model_name", "demo")))]
    assert ok == codes.count(200)


def test_bad_requests(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory()
    r = httpx.post(f"{stub.url}/v1/chat/completions", json={"model": "other", "messages": []})
    assert r.status_code == 404 and "other" in r.json()["message"]
    r = httpx.post(f"{stub.url}/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert httpx.get(f"{stub.url}/nowhere").status_code == 404
    assert httpx.get(f"{stub.url}/v1/chat/completions").status_code == 405


def test_keep_alive_reuses_one_connection(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory()
    conn = http.client.HTTPConnection("127.0.0.1", stub.port, timeout=10)
    try:
        peers = []
        for stream in (True, False, True):
            conn.request("POST", "/v1/chat/completions", body=json.dumps(chat("a", max_tokens=3, stream=stream)),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            assert conn.sock is not None
            peers.append(conn.sock.getsockname())
        assert len(set(peers)) == 1
    finally:
        conn.close()


def test_metrics_families_and_counters(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(itl_ms=1.0)
    text = httpx.get(f"{stub.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge", "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter", "vllm:request_success": "counter",
        "vllm:time_to_first_token_seconds": "histogram", "vllm:inter_token_latency_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram", "vllm:request_queue_time_seconds": "histogram",
        "vllm:spec_decode_num_drafts": "counter", "vllm:spec_decode_num_accepted_tokens": "counter",
    }
    for name, kind in expected.items():
        assert name in families, name
        assert families[name].type == kind
        for sample in families[name].samples:
            assert sample.labels["model_name"] == "demo" and sample.labels["engine"] == "0"
    labels = (("engine", "0"), ("model_name", "demo"))
    before = metric_samples(stub.url)
    body = chat("w1 w2 w3", stream=True, max_tokens=6)
    for _ in range(3):
        httpx.post(f"{stub.url}/v1/chat/completions", json=body)
    after = metric_samples(stub.url)
    assert after[("vllm:prompt_tokens_total", labels)] - before[("vllm:prompt_tokens_total", labels)] == 9
    gen = "vllm:generation_tokens_total"
    assert after[(gen, labels)] - before[(gen, labels)] == 18
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count"):
        assert after[(name, labels)] - before[(name, labels)] == 3
    itl = "vllm:inter_token_latency_seconds_count"
    assert after[(itl, labels)] - before[(itl, labels)] == 15
    assert after[("vllm:spec_decode_num_drafts_total", labels)] > 0
    assert after[("vllm:num_requests_running", labels)] == 0


def test_client_disconnect_counts_abort(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(itl_ms=50.0, max_tokens=200)
    labels = (("engine", "0"), ("model_name", "demo"))
    with httpx.Client() as client:
        body = chat("x", stream=True, max_tokens=200)
        with client.stream("POST", f"{stub.url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    assert metric_samples(stub.url)[("vllm:num_requests_running", labels)] == 1
                    break
    deadline = time.monotonic() + 10
    abort = ("vllm:request_success_total", (("engine", "0"), ("finished_reason", "abort"), ("model_name", "demo")))
    while time.monotonic() < deadline:
        m = metric_samples(stub.url)
        if m[abort] == 1 and m[("vllm:num_requests_running", labels)] == 0:
            break
        time.sleep(0.05)
    assert m[abort] == 1
    assert m[("vllm:num_requests_running", labels)] == 0


def wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"stub at {url} not healthy after {deadline_s} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_subprocess_exits_zero_promptly_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "exporter_watchdog.demo.llm", "--port", str(port), "--itl-ms", "100",
         "--max-tokens", "1000"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, proc)
        # A stream in flight must not hold the exit up.
        with httpx.Client(timeout=30) as client:
            body = chat("x", stream=True, max_tokens=1000)
            with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        break
                sent = time.monotonic()
                proc.send_signal(sig)
                rc = proc.wait(timeout=10)
        assert rc == 0, proc.communicate()
        assert time.monotonic() - sent < 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_cli_rejects_bad_values() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "exporter_watchdog.demo.llm", "--error-rate", "1.5"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert "--error-rate" in proc.stderr and "1.5" in proc.stderr
