"""Simulated GPUs: plausible values that follow the load, faults and XIDs, and the load read from the stub."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from exporter_watchdog.demo.gpus import IDLE_W, MAX_W, TOTAL_MIB, SimulatedGpus, StubLoad, running_requests
from exporter_watchdog.demo.llm import StubConfig, StubServer
from exporter_watchdog.metrics.gpm import GpmSampler
from exporter_watchdog.metrics.gpu import DCGM_FAMILIES, GpuCollector, XidWatcher
from exporter_watchdog.metrics.nvml import GpuBackendError, GpuErrorKind

MIB = 1024 * 1024


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.02)


def test_busy_gpu_follows_load_and_idle_gpu_stays_cool() -> None:
    now = [0.0]
    load = [1.0]
    sim = SimulatedGpus(2, lambda: load[0], processes=lambda g: [(4242, 18 << 30)] if g == 1 else [],
                        clock=lambda: now[0])
    for gpu in (0, 1):
        sim.utilization(gpu)  # start both clocks at t=0
    now[0] = 120.0
    busy, idle = sim.utilization(1), sim.utilization(0)
    assert 90 <= busy.gpu <= 100 and busy.memory > 0
    assert idle.gpu == 0
    assert sim.power_mw(1) == pytest.approx(MAX_W * 1000, rel=0.01)
    assert sim.power_mw(0) == pytest.approx(IDLE_W * 1000)
    assert sim.gpu_temperature(1) > sim.gpu_temperature(0) + 30
    assert sim.memory_temperature(1) > sim.gpu_temperature(1)
    assert sim.sm_clock_mhz(1) > 4 * sim.sm_clock_mhz(0)
    mem = sim.memory(1)
    assert mem.used >= 18 << 30 and mem.total == TOTAL_MIB * MIB
    assert mem.used + mem.free + (mem.reserved or 0) == mem.total
    assert [(p.pid, p.used_memory) for p in sim.compute_processes(1)] == [(4242, 18 << 30)]
    assert sim.compute_processes(0) == []

    load[0] = 0.0
    now[0] = 240.0
    assert sim.utilization(1).gpu == 0
    assert sim.memory(1).used < mem.used


def test_energy_counter_integrates_power() -> None:
    now = [0.0]
    sim = SimulatedGpus(1, lambda: 0.0, clock=lambda: now[0])
    start = sim.total_energy_mj(0)
    now[0] = 10.0
    assert sim.total_energy_mj(0) - start == pytest.approx(IDLE_W * 10 * 1000, rel=1e-6)
    before = sim.total_energy_mj(0)
    now[0] = 11.0
    assert sim.total_energy_mj(0) > before  # a counter: never goes down


def test_bad_load_source_reads_as_idle() -> None:
    def broken() -> float:
        raise RuntimeError("load source down")

    now = [0.0]
    sim = SimulatedGpus(1, broken, clock=lambda: now[0])
    sim.utilization(0)
    now[0] = 60.0
    assert sim.utilization(0).gpu == 0


def test_collector_over_simulated_gpus_has_every_family_and_reports_faults() -> None:
    now = [0.0]
    sim = SimulatedGpus(3, lambda: 0.5, clock=lambda: now[0])
    xids = XidWatcher(sim, poll_seconds=0.05).start()
    gpm = GpmSampler(sim, interval=1.0, clock=lambda: now[0])
    try:
        gpm.sample_once()
        now[0] += 1.0
        gpm.sample_once()  # two samples: the profiling fields have values
        registry = CollectorRegistry()
        registry.register(GpuCollector(sim, "demo-node", cache_seconds=0.0, xids=xids, gpm=gpm))
        names = {m.name for m in registry.collect()}
        assert set(DCGM_FAMILIES) <= names
        sim.set_fault(1, GpuErrorKind.LOST)
        assert registry.get_sample_value("exporter_watchdog_gpu_lost", {"gpu": "1"}) == 1
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 0
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "2"}) == 1
        sim.set_fault(1, None)
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 1
        sim.inject_xid(2, 94)
        wait_for(lambda: registry.get_sample_value(
            "exporter_watchdog_gpu_xid_errors_total", {"gpu": "2", "xid": "94"}) == 1)
    finally:
        xids.stop()
    with pytest.raises(GpuBackendError):
        sim.utilization(3)


def test_running_requests_from_a_vllm_exposition() -> None:
    registry = CollectorRegistry()
    g = Gauge("vllm:num_requests_running", "Running.", ["model_name", "engine"], registry=registry)
    g.labels("demo", "0").set(3)
    g.labels("demo", "1").set(2)
    Gauge("vllm:num_requests_running_extra", "Not it.", registry=registry).set(100)
    assert running_requests(generate_latest(registry).decode()) == 5
    assert running_requests("vllm:num_requests_running 4\n") == 4
    assert running_requests("") == 0


def test_stub_load_follows_the_real_stub_server_and_reads_zero_when_it_is_down() -> None:
    server = StubServer(StubConfig(port=0, ttft_ms=1500.0, itl_ms=1.0, max_tokens=4))
    server.start()
    load = StubLoad(f"{server.url}/metrics", full_at=4.0, cache_seconds=0.0)
    clients: list[threading.Thread] = []
    try:
        assert load() == 0.0

        def ask() -> None:
            with httpx.Client(timeout=30) as client:
                client.post(f"{server.url}/v1/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 4})

        clients = [threading.Thread(target=ask) for _ in range(2)]
        for t in clients:
            t.start()
        wait_for(lambda: load() == pytest.approx(0.5))
        for t in clients:
            t.join(30)
        wait_for(lambda: load() == 0.0)
    finally:
        for t in clients:
            t.join(30)
        server.stop()
    assert load() == 0.0  # nobody listens any more
    load.close()


def test_stub_load_is_cached() -> None:
    hits = [0]

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits[0] += 1
            body = b'vllm:num_requests_running{model_name="m"} 8.0\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    now = [0.0]
    load = StubLoad(f"http://127.0.0.1:{server.server_address[1]}/metrics", full_at=8.0, cache_seconds=1.0,
                    clock=lambda: now[0])
    try:
        assert load() == 1.0
        assert load() == 1.0
        assert hits[0] == 1
        now[0] = 1.5
        assert load() == 1.0
        assert hits[0] == 2
    finally:
        load.close()
        server.shutdown()
        server.server_close()
        thread.join(10)
