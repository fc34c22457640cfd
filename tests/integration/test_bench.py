"""`exporter-watchdog bench` against the demo stub server (and a few hand-made servers) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import random
import re
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from exporter_watchdog.bench.command import main, sweep_levels
from exporter_watchdog.bench.dataset import DatasetError, load_jsonl, random_prompts
from exporter_watchdog.bench.report import Progress
from exporter_watchdog.bench.runner import LoadSpec, RequestResult, arrivals, run_load
from exporter_watchdog.bench.stats import percentile, summarize
from exporter_watchdog.demo.llm import StubServer
from tests.support.waiting import free_port

REPO = Path(__file__).resolve().parents[2]
VLLM_FIELDS = [
    "duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "max_concurrent_requests", "input_lens", "output_lens",
    "ttfts", "itls", "errors", "num_prompts", "request_rate", "burstiness", "max_concurrency", "model_id",
] + [f"{s}_{m}_ms" for s in ("mean", "median", "std", "p99") for m in ("ttft", "tpot", "itl", "e2el")]



class _Handler(BaseHTTPRequestHandler):
    """Serves a fixed route table: path -> (status, content type, body)."""

    routes: dict[str, tuple[int, str, bytes]] = {}

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, ctype, body = self.routes.get(self.path, (404, "text/plain", b"no"))
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fixed_server() -> Iterator[Callable[[dict[str, tuple[int, str, bytes]]], str]]:
    servers: list[ThreadingHTTPServer] = []

    def make(routes: dict[str, tuple[int, str, bytes]]) -> str:
        handler = type("H", (_Handler,), {"routes": routes})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def run_cli(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("EXPORTER_WATCHDOG_")}
    full_env.update(env, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "exporter_watchdog.bench.command", *argv], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=120)


def only_json(result_dir: Path) -> dict[str, Any]:
    files = list(result_dir.glob("*.json"))
    assert len(files) == 1, files
    data: dict[str, Any] = json.loads(files[0].read_text())
    return data


def stub_successes(url: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "vllm:request_success":
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def test_measured_latencies_match_the_stub(stub_factory: Callable[..., StubServer], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    ttft_ms, itl_ms, out_len, in_len, n = 200.0, 20.0, 40, 30, 6
    stub = stub_factory(ttft_ms=ttft_ms, itl_ms=itl_ms)
    rc = main(["--url", stub.url, "--num-prompts", str(n), "--max-concurrency", "2", "--input-len", str(in_len),
               "--output-len", str(out_len), "--result-dir", str(tmp_path), "--status-url", ""])
    assert rc == 0
    r = only_json(tmp_path)
    assert (r["completed"], r["failed"]) == (n, 0)
    assert r["total_input_tokens"] == n * in_len
    assert r["total_output_tokens"] == n * out_len
    assert r["output_lens"] == [out_len] * n and r["input_lens"] == [in_len] * n
    assert all(len(itl) == out_len - 1 for itl in r["itls"])
    assert r["mean_ttft_ms"] == pytest.approx(ttft_ms, rel=0.10)
    assert r["mean_itl_ms"] == pytest.approx(itl_ms, rel=0.10)
    assert r["mean_tpot_ms"] == pytest.approx(itl_ms, rel=0.10)
    assert r["mean_e2el_ms"] == pytest.approx(ttft_ms + (out_len - 1) * itl_ms, rel=0.10)
    assert r["max_concurrent_requests"] == 2
    assert r["request_throughput"] == pytest.approx(n / r["duration"])
    table = capsys.readouterr().out
    assert "Serving Benchmark Result" in table and "Mean TTFT (ms):" in table


def test_result_json_fields_and_daemon_info(stub_factory: Callable[..., StubServer], tmp_path: Path,
                                            fixed_server: Callable[..., str]) -> None:
    status = {"state": "serving", "profile": "demo", "claimed_gpus": [2, 3], "server_pid": 1,
              "server_argv": ["python", "-m", "exporter_watchdog.demo.llm", "--port", "8000"]}
    daemon = fixed_server({"/status": (200, "application/json", json.dumps(status).encode())})
    stub = stub_factory(model="served-name", itl_ms=1.0)
    proc = run_cli(["quick", "--url", f"{stub.url}/v1/", "--input-len", "8", "--output-len", "5",
                    "--result-dir", str(tmp_path), "--status-url", f"{daemon}/status"])
    assert proc.returncode == 0, proc.stderr
    r = only_json(tmp_path)
    for key in VLLM_FIELDS:
        assert key in r, key
    assert r["num_prompts"] == 5 and r["completed"] == 5
    for key in ("input_lens", "output_lens", "ttfts", "itls", "errors", "generated_texts"):
        assert len(r[key]) == 5, key
    assert r["errors"] == [""] * 5
    assert (r["model_id"], r["model"]) == ("served-name", "served-name")
    assert (r["profile"], r["gpu_count"], r["server_args"]) == ("demo", 2, status["server_argv"])
    assert r["request_rate"] == "inf"
    assert "results:" in proc.stdout
    # Not a terminal: progress as plain lines, no carriage returns.
    assert "5/5" in proc.stderr and "\r" not in proc.stderr


def test_failures_counted_with_error_injection(stub_factory: Callable[..., StubServer], tmp_path: Path) -> None:
    stub = stub_factory(error_rate=0.5, seed=11)
    rc = main(["--url", stub.url, "--num-prompts", "30", "--max-concurrency", "4", "--input-len", "4",
               "--output-len", "3", "--result-dir", str(tmp_path), "--status-url", ""])
    assert rc == 0
    r = only_json(tmp_path)
    assert r["failed"] > 0 and r["completed"] > 0
    assert r["completed"] + r["failed"] == 30
    assert r["completed"] == stub_successes(stub.url)
    assert r["error_counts"] == {"HTTP 500": r["failed"]}
    assert sum(1 for e in r["errors"] if e.startswith("HTTP 500")) == r["failed"]
    assert r["total_output_tokens"] == 3 * r["completed"]


def test_every_request_failing_exits_1(stub_factory: Callable[..., StubServer], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    stub = stub_factory(error_rate=1.0)
    rc = main(["quick", "--url", stub.url, "--input-len", "4", "--output-len", "3", "--result-dir",
               str(tmp_path), "--status-url", ""])
    assert rc == 1
    assert "every request failed" in capsys.readouterr().err
    assert only_json(tmp_path)["failed"] == 5


def test_timeouts_counted(stub_factory: Callable[..., StubServer], tmp_path: Path) -> None:
    stub = stub_factory(ttft_ms=3000.0)
    rc = main(["quick", "--url", stub.url, "--timeout", "0.3", "--input-len", "4", "--output-len", "3",
               "--result-dir", str(tmp_path), "--status-url", ""])
    assert rc == 1
    r = only_json(tmp_path)
    assert r["error_counts"] == {"timeout": 5}


def test_connection_errors_counted() -> None:
    # A server that accepts and hangs up at once: every request breaks, the run still ends.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        spec = LoadSpec(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}", model="m", timeout=10)
        outcome = asyncio.run(run_load(spec, random_prompts(4, 3, 3, seed=0)))
    finally:
        stop.set()
        thread.join()
        listener.close()
    r = summarize(outcome)
    assert (r["completed"], r["failed"]) == (0, 4)
    assert r["error_counts"] == {"connection error": 4}


def test_tokens_counted_from_stream_without_usage(fixed_server: Callable[..., str]) -> None:
    words = ["alpha ", "beta ", "gamma ", "delta "]
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in words]
    chunks.insert(0, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\r\n\r\n" for c in chunks) + b"data: [DONE]\r\n\r\n"
    url = fixed_server({"/v1/chat/completions": (200, "text/event-stream", body)})
    spec = LoadSpec(base_url=url, model="m")
    outcome = asyncio.run(run_load(spec, random_prompts(3, 7, 50, seed=1)))
    for res in outcome.results:
        assert res.success, res.error
        assert res.output_tokens == len(words)
        assert res.generated_text == "".join(words)
        assert res.prompt_len == 7
        assert len(res.itl) == len(words) - 1


def test_error_inside_stream_is_a_failure(fixed_server: Callable[..., str]) -> None:
    body = b'data: {"error": {"message": "engine died", "code": 500}}\n\ndata: [DONE]\n\n'
    url = fixed_server({"/v1/chat/completions": (200, "text/event-stream", body)})
    outcome = asyncio.run(run_load(LoadSpec(base_url=url, model="m"), random_prompts(2, 3, 3, seed=1)))
    assert all(not r.success and r.reason == "stream error" and "engine died" in r.error
               for r in outcome.results)


def test_concurrency_limit_and_poisson_arrivals(stub_factory: Callable[..., StubServer]) -> None:
    stub = stub_factory(itl_ms=5.0)
    spec = LoadSpec(base_url=stub.url, model="demo", max_concurrency=3)
    outcome = asyncio.run(run_load(spec, random_prompts(12, 3, 10, seed=2)))
    assert outcome.max_concurrent_requests == 3
    assert all(r.success for r in outcome.results)
    rate = 40.0
    spec = LoadSpec(base_url=stub.url, model="demo", request_rate=rate, seed=5)
    outcome = asyncio.run(run_load(spec, random_prompts(30, 3, 2, seed=2)))
    starts = sorted(r.start for r in outcome.results)
    # The schedule the seed gives; requests may start late on a busy machine, never early.
    rng = random.Random(5)
    due = [0.0]
    for _ in range(29):
        due.append(due[-1] + rng.gammavariate(1.0, 1.0 / rate))
    assert all(s >= d - 0.005 for s, d in zip(starts, due, strict=True))
    assert starts[-1] >= due[-1] - 0.005


def test_arrival_intervals_are_exponential_with_the_rate() -> None:
    async def collect() -> list[int]:
        return [i async for i in arrivals(3, math.inf, 1.0, random.Random(0))]
    assert asyncio.run(collect()) == [0, 1, 2]
    rng = random.Random(9)
    gaps = [rng.gammavariate(1.0, 1.0 / 50.0) for _ in range(20000)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50.0, rel=0.03)


def test_sweep_writes_levels_table_and_plot(stub_factory: Callable[..., StubServer], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stub = stub_factory(itl_ms=2.0)
    rc = main(["sweep", "--url", stub.url, "--max-concurrency", "4", "--num-prompts", "4", "--input-len", "4",
               "--output-len", "6", "--result-dir", str(tmp_path), "--status-url", ""])
    assert rc == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len([n for n in names if n.endswith(".svg")]) == 1
    for level in (1, 2, 4):
        level_file = next(tmp_path.glob(f"*-c{level}.json"))
        r = json.loads(level_file.read_text())
        assert r["max_concurrency"] == level and r["completed"] == 4
        assert r["max_concurrent_requests"] <= level
    summaries = [p for p in tmp_path.glob("*.json") if not re.search(r"-c\d+\.json$", p.name)]
    assert len(summaries) == 1
    summary = json.loads(summaries[0].read_text())
    assert [lv["max_concurrency"] for lv in summary["levels"]] == [1, 2, 4]
    svg = ET.parse(next(tmp_path.glob("*.svg"))).getroot()
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 2 * 3
    out = capsys.readouterr().out
    assert "conc" in out and "E2EL p99" in out and "plot:" in out


def test_sweep_levels() -> None:
    assert sweep_levels(64) == [1, 2, 4, 8, 16, 32, 64]
    assert sweep_levels(48) == [1, 2, 4, 8, 16, 32, 48]
    assert sweep_levels(1) == [1]


def test_cli_server_down_exits_1() -> None:
    proc = run_cli(["quick", "--url", f"http://127.0.0.1:{free_port()}", "--status-url", ""])
    assert proc.returncode == 1
    assert "cannot reach the server" in proc.stderr


def test_cli_wrong_api_key_exits_1(stub_factory: Callable[..., StubServer], tmp_path: Path) -> None:
    stub = stub_factory(api_key="right")
    proc = run_cli(["quick", "--url", stub.url, "--api-key", "wrong", "--status-url", ""])
    assert proc.returncode == 1
    assert "HTTP 401" in proc.stderr and "API key" in proc.stderr
    proc = run_cli(["quick", "--url", stub.url, "--status-url", ""])
    assert proc.returncode == 1 and "needs an API key" in proc.stderr
    # The key and the URL from the environment.
    proc = run_cli(["quick", "--input-len", "3", "--output-len", "2", "--result-dir", str(tmp_path),
                    "--status-url", ""], EXPORTER_WATCHDOG_URL=stub.url, EXPORTER_WATCHDOG_API_KEY="right")
    assert proc.returncode == 0, proc.stderr
    assert only_json(tmp_path)["completed"] == 5


def test_cli_bad_usage_exits_2(stub_factory: Callable[..., StubServer], tmp_path: Path) -> None:
    stub = stub_factory()
    for argv, needle in (
        (["--num-prompts", "0"], "--num-prompts"),
        (["--request-rate", "-1"], "--request-rate"),
        (["nonsense"], "invalid choice"),
        (["--dataset", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--model", "other"], None),
        (["--tunnel"], "not allowed with argument"),
    ):
        proc = run_cli([*argv, "--url", stub.url, "--status-url", ""])
        if needle is None:
            # A model the server does not serve is the server's answer, not bad usage.
            assert proc.returncode == 1 and "'other'" in proc.stderr
        else:
            assert proc.returncode == 2, (argv, proc.stderr)
            assert needle in proc.stderr
    proc = run_cli(["--tunnel", "--status-url", ""])
    assert proc.returncode == 2 and "no tunnel hostname is configured" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    proc = run_cli(["--dataset", str(bad), "--url", stub.url, "--status-url", ""])
    assert proc.returncode == 2
    assert f"{bad}:2" in proc.stderr and "'prompt'" in proc.stderr and "3" in proc.stderr


def test_jsonl_dataset(stub_factory: Callable[..., StubServer], tmp_path: Path) -> None:
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "one two three", "output_len": 4}) + "\n\n"
                    + json.dumps({"messages": [{"role": "system", "content": "be brief"},
                                               {"role": "user", "content": "a b c d e"}]}) + "\n")
    prompts = load_jsonl(data, 5, 7, seed=0)
    assert len(prompts) == 5
    assert sorted({p.output_len for p in prompts}) == [4, 7]
    stub = stub_factory()
    rc = main(["--dataset", str(data), "--num-prompts", "6", "--output-len", "7", "--url", stub.url,
               "--result-dir", str(tmp_path / "out"), "--status-url", ""])
    assert rc == 0
    r = only_json(tmp_path / "out")
    assert r["completed"] == 6
    assert sorted(set(r["input_lens"])) == [3, 7]
    assert sum(r["output_lens"]) == r["total_output_tokens"]
    with pytest.raises(DatasetError, match="missing key 'prompt' or 'messages'"):
        (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
        load_jsonl(tmp_path / "x.jsonl", 1, 1, seed=0)


def test_random_prompts_are_seeded() -> None:
    a, b, c = (random_prompts(3, 12, 5, seed=s) for s in (1, 1, 2))
    assert a == b and a != c
    assert all(len(p.messages[0]["content"].split()) == 12 for p in a)


def test_percentiles_match_numpy_definition() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(1, 101)], 99) == pytest.approx(99.01)
    assert percentile([], 99) == 0.0


def test_progress_bar_only_on_a_terminal() -> None:
    plain = io.StringIO()
    bar = Progress(20, plain, "bench")
    for i in range(20):
        bar.update(RequestResult(success=i % 5 != 0))
    bar.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1] == "bench: 20/20 done, 4 failed"
    assert "\r" not in plain.getvalue()

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    bar = Progress(3, tty, "bench")
    for _ in range(3):
        bar.update(RequestResult(success=True))
    bar.close()
    assert tty.getvalue().startswith("\r") and "3/3" in tty.getvalue() and tty.getvalue().endswith("\n")
