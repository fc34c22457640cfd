"""The collector over real NVML, next to `nvidia-smi --query-gpu` (skipped without an NVIDIA GPU)."""

from __future__ import annotations

import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter_watchdog.metrics.gpu import GpuCollector, XidWatcher
from exporter_watchdog.metrics.http import MetricsServer
from exporter_watchdog.metrics.nvml import GpuUnavailable, NvmlBackend

pytestmark = pytest.mark.gpu

FIELDS = ("index,uuid,name,pci.bus_id,utilization.gpu,utilization.memory,memory.used,memory.free,"
          "memory.reserved,temperature.gpu,temperature.memory,power.draw,clocks.sm,clocks.mem")


@pytest.fixture(scope="module")
def backend() -> Iterator[NvmlBackend]:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi")
    try:
        b = NvmlBackend.open()
    except GpuUnavailable as exc:
        pytest.skip(f"no GPU: {exc}")
    if b.device_count() == 0:
        b.close()
        pytest.skip("NVML sees no GPU")
    yield b
    b.close()


def smi() -> list[dict[str, str]]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    keys = FIELDS.split(",")
    return [dict(zip(keys, (v.strip() for v in line.split(",")), strict=True)) for line in out.strip().splitlines()]


def num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # [N/A], [Not Supported]


def test_collector_matches_nvidia_smi(backend: NvmlBackend) -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(backend, socket.gethostname(), cache_seconds=0.0))
    rows = smi()
    fams = {m.name: m for m in registry.collect()}
    print()
    print(f"{'gpu':>3} {'field':<28} {'exporter':>12} {'nvidia-smi':>12}")
    for row in rows:
        gpu = row["index"]
        samples = {name: s for name, m in fams.items() for s in m.samples if s.labels.get("gpu") == gpu}
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": gpu}) == 1
        labels = samples["DCGM_FI_DEV_GPU_TEMP"].labels
        assert labels["UUID"] == row["uuid"]
        assert labels["modelName"] == row["name"]
        assert labels["pci_bus_id"].lower() == row["pci.bus_id"].lower()
        checks = [
            ("DCGM_FI_DEV_GPU_UTIL", "utilization.gpu", 25.0),
            ("DCGM_FI_DEV_MEM_COPY_UTIL", "utilization.memory", 25.0),
            ("DCGM_FI_DEV_FB_USED", "memory.used", 64.0),
            ("DCGM_FI_DEV_FB_FREE", "memory.free", 64.0),
            ("DCGM_FI_DEV_FB_RESERVED", "memory.reserved", 1.0),
            ("DCGM_FI_DEV_GPU_TEMP", "temperature.gpu", 3.0),
            ("DCGM_FI_DEV_MEMORY_TEMP", "temperature.memory", 3.0),
            ("DCGM_FI_DEV_POWER_USAGE", "power.draw", 40.0),
            ("DCGM_FI_DEV_SM_CLOCK", "clocks.sm", 400.0),
            ("DCGM_FI_DEV_MEM_CLOCK", "clocks.mem", 400.0),
        ]
        for family, field, tolerance in checks:
            ours = samples[family].value if family in samples else None
            theirs = num(row[field])
            print(f"{gpu:>3} {family:<28} {ours!s:>12} {row[field]:>12}")
            if theirs is None:
                continue  # nvidia-smi cannot tell either; a value of ours is then not checked
            assert ours is not None, f"GPU {gpu}: {family} missing while nvidia-smi says {row[field]}"
            assert abs(ours - theirs) <= tolerance, f"GPU {gpu}: {family} {ours} vs nvidia-smi {theirs}"
        energy = samples["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].value if "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION" in \
            samples else None
        print(f"{gpu:>3} {'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION':<28} {energy!s:>12}")


def test_energy_counter_rises(backend: NvmlBackend) -> None:
    first = backend.total_energy_mj(0)
    deadline = time.monotonic() + 10
    while backend.total_energy_mj(0) <= first:
        assert time.monotonic() < deadline, "energy counter did not move in 10 s"
        time.sleep(0.1)


def test_xid_watcher_runs_on_real_nvml(backend: NvmlBackend) -> None:
    xids = XidWatcher(backend, poll_seconds=0.2).start()
    try:
        time.sleep(0.5)  # one or two empty waits on the event set (or it stops: events unsupported)
        last, counts = xids.snapshot()
        assert isinstance(last, dict) and isinstance(counts, dict)
    finally:
        xids.stop()
    assert not xids.running


def test_scrape_time_with_real_nvml(backend: NvmlBackend) -> None:
    registry = CollectorRegistry()
    collector = GpuCollector(backend, socket.gethostname(), cache_seconds=0.0)
    registry.register(collector)
    server = MetricsServer("127.0.0.1:0", registry, dict, lambda: True).start()
    try:
        times: list[float] = []
        with httpx.Client() as client:
            for _ in range(200):
                started = time.perf_counter()
                r = client.get(f"http://127.0.0.1:{server.port}/metrics", headers={"Accept-Encoding": "gzip"})
                times.append(time.perf_counter() - started)
                assert r.status_code == 200
        last_pass = registry.get_sample_value("exporter_watchdog_gpu_collect_duration_seconds")
        print(f"\n{backend.device_count()} GPU(s), real NVML, no cache: median scrape "
              f"{statistics.median(times) * 1000:.2f} ms, p90 {sorted(times)[int(len(times) * 0.9)] * 1000:.2f} ms, "
              f"last NVML pass {(last_pass or 0) * 1000:.2f} ms")
    finally:
        server.stop()
