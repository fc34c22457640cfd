"""Fault table, /metrics under load: 200 concurrent scrapers plus 50 idle connections against a real
`serve --demo` daemon; every scrape answered, the loop's heartbeat fresh, a job still makes it yield,
threads and memory bounded. The HTTP server's own limits (idle timeout, connection cap, pipelining)
are shown on a MetricsServer in this process. Speed figures: benchmarks/metrics_load.py."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter

from exporter_watchdog.metrics.http import WORKERS, MetricsServer
from tests.support.daemon import DaemonProc, wait_until
from tests.support.procstat import heartbeat_age, rss_kib, threads
from tests.support.scrapeload import ScrapeLoad

HEARTBEAT_BOUND = 15.0  # the loop wakes at least every 5 s (slurm.rescan_seconds); generous for a busy machine


def test_200_scrapers_and_50_idle_connections(daemon: DaemonProc) -> None:
    doc = daemon.start().status()
    assert doc is not None
    pid = daemon.proc.pid  # type: ignore[union-attr]
    httpx.get(f"{daemon.url}/metrics", timeout=10)  # the first scrape starts the worker threads
    rss_before, threads_before = rss_kib(pid), threads(pid)

    load = ScrapeLoad("127.0.0.1", daemon.metrics_port, scrapers=200, idle=50, rounds=3).start()
    try:
        # While the crowd scrapes: the daemon's threads stay bounded, its loop comes round, and a
        # job on a claimed GPU still makes it yield.
        peak_threads = threads(pid)
        server_pgid = doc["server_pid"]
        fd = os.pidfd_open(server_pgid)
        t0 = time.monotonic()
        job = daemon.demo_job("--gpus", str(doc["claimed_gpus"][-1]), "--seconds", "0")
        try:
            readable, _, _ = select.select([fd], [], [], 60)
            yielded_in = time.monotonic() - t0
        finally:
            os.close(fd)
        assert readable, "the server did not stop for the job while /metrics was under load"
        ages = [heartbeat_age(f"{daemon.url}/metrics", timeout=120)]
        peak_threads = max(peak_threads, threads(pid))
        load.wait(300)
        peak_threads = max(peak_threads, threads(pid))
        ages.append(heartbeat_age(f"{daemon.url}/metrics", timeout=120))
        idle_open = load.idle_still_open()
    finally:
        results = load.stop()
    daemon.cli("demo", "job", "--cancel", job, check=True)

    assert len(results.statuses) == 600 and set(results.statuses) == {200}, (
        f"{results.statuses.count(200)} of {len(results.statuses)} scrapes answered 200; errors: {results.errors[:5]}")
    assert max(ages) < HEARTBEAT_BOUND, ages
    # 250 connections were open at once; the old thread-per-connection server ran 250 threads for them.
    assert peak_threads <= threads_before + WORKERS + 8, (threads_before, peak_threads)
    assert idle_open == 50, "idle connections younger than the idle timeout stay open"
    rss_after = rss_kib(pid)
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)
    print(f"/metrics load: 600 scrapes all 200, p50 {results.percentile(50) * 1000:.0f} ms, "
          f"p99 {results.percentile(99) * 1000:.0f} ms; yield under load {yielded_in * 1000:.0f} ms; "
          f"heartbeat ages {ages}; threads {threads_before} -> peak {peak_threads}; "
          f"RSS {rss_before} -> {rss_after} KiB")
    # The idle ones are the daemon's to close: once the crowd is gone they cost nothing.
    wait_until(lambda: threads(pid) <= threads_before + 2, 30, "threads back to the baseline")


@pytest.fixture
def small_server() -> Iterator[MetricsServer]:
    """A MetricsServer with a short idle timeout and room for 4 connections."""
    registry = CollectorRegistry()
    Counter("probe", "A sample so /metrics has a body.", registry=registry).inc()
    server = MetricsServer("127.0.0.1:0", registry, status=lambda: {"ok": True}, healthy=lambda: True,
                           idle_timeout=0.5, max_connections=4).start()
    try:
        yield server
    finally:
        server.stop()


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    sock.settimeout(timeout)
    try:
        while True:
            if sock.recv(65536) == b"":
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_trickling_connections_are_closed_after_the_idle_timeout(small_server: MetricsServer) -> None:
    port = small_server.port
    silent = socket.create_connection(("127.0.0.1", port))
    kept = socket.create_connection(("127.0.0.1", port))
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept.recv(65536).startswith(b"HTTP/1.1 200")
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"GET /metr")  # a head that never completes
    started = time.monotonic()
    for sock in (silent, kept, trickle):
        assert _closed_by_server(sock, 30), "an idle connection must be closed by the server"
        sock.close()
    assert time.monotonic() - started < 30
    wait_until(lambda: small_server.open_connections() == 0, 10, "no connection left open")


def test_past_the_cap_the_longest_idle_connection_makes_room(small_server: MetricsServer) -> None:
    port = small_server.port
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    wait_until(lambda: small_server.open_connections() == 4, 10, "4 idle connections held")
    # A fifth client is served: the oldest idle connection is closed for it.
    response = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200 and "probe_total 1.0" in response.text
    assert _closed_by_server(idle[0], 10)
    assert small_server.open_connections() <= 4
    for sock in idle:
        sock.close()


def test_pipelined_requests_on_one_connection_are_all_answered(small_server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3, data[:500]
    assert b"ok\n" in data and b"probe_total 1.0" in data and b'"ok": true' in data


def test_a_post_with_a_body_is_refused_and_closed(small_server: MetricsServer) -> None:
    with socket.create_connection(("127.0.0.1", small_server.port)) as sock:
        sock.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nGET /")
        sock.settimeout(10)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 405") and data.count(b"HTTP/1.1") == 1


def test_a_client_that_never_reads_its_answers_holds_no_worker() -> None:
    registry = CollectorRegistry()
    big = Counter("big", "A family large enough to fill socket buffers.", ["n"], registry=registry)
    for i in range(3000):
        big.labels(str(i)).inc()
    server = MetricsServer("127.0.0.1:0", registry, status=lambda: {}, healthy=lambda: True, workers=1).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as stuck:
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # 50 pipelined scrapes of ~150 KB each, never read: megabytes the kernel cannot buffer.
            stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 50)
            for _ in range(5):
                response = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10)
                assert response.status_code == 200 and 'big_total{n="2999"} 1.0' in response.text
    finally:
        server.stop()


def test_scrapes_share_a_rendering_until_the_daemon_publishes_a_new_snapshot() -> None:
    registry = CollectorRegistry()
    counter = Counter("events", "Something the loop counts.", registry=registry)
    snapshot = [object()]
    server = MetricsServer("127.0.0.1:0", registry, status=lambda: {}, healthy=lambda: True,
                           render_key=lambda: snapshot[0], render_max_age=60.0).start()
    try:
        def scrape() -> str:
            return httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=10).text

        assert "events_total 0.0" in scrape()
        counter.inc()
        assert "events_total 0.0" in scrape()  # the same snapshot: the crowd shares one rendering
        snapshot[0] = object()  # the loop came round and published
        assert "events_total 1.0" in scrape()
    finally:
        server.stop()
