"""Simulated A30-like GPUs behind the same GpuBackend interface as NVML, driven by the stub server's load.

They also answer the calls newer boards answer (GPM profiling, as on Hopper; NVLink through a bridge;
remapped rows), so the demo shows every family the exporter has."""

from __future__ import annotations

import math
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from loguru import logger

from exporter_watchdog.metrics.nvml import (
    GpmValues,
    GpuBackendError,
    GpuErrorKind,
    GpuProcess,
    MemoryInfo,
    MigDevice,
    RemappedRows,
    Utilization,
    XidEvent,
)

MIB = 1024 * 1024
MODEL = "NVIDIA A30"
TOTAL_MIB = 24576
RESERVED_MIB = 467  # what the driver keeps back on a 24 GiB board
IDLE_W, MAX_W = 28.0, 165.0
IDLE_SM_MHZ, MAX_SM_MHZ, MEM_MHZ = 210.0, 1440.0, 1215.0
ACTIVATIONS_MIB = 2048  # memory the server grows into under full load (KV cache is preallocated)
UTIL_TAU_S, TEMP_TAU_S = 2.0, 30.0  # utilisation reacts in seconds, temperature over half a minute
DRIVER = "550.54.15"
NVLINK_LINKS = 4  # an NVLink bridge between pairs of boards
# Profiling ratios of a busy LLM server per unit of load: SMs busy, warps resident, tensor pipes, DRAM.
SM_PER_LOAD, OCCUPANCY_PER_LOAD, TENSOR_PER_LOAD, DRAM_PER_LOAD = 0.92, 0.45, 0.55, 0.62
# Link traffic (MiB/s): a floor of housekeeping plus what tensor-parallel steps move under full load.
PCIE_IDLE_MIB_S, PCIE_BUSY_MIB_S = 2.0, 900.0
NVLINK_BUSY_MIB_S = 18000.0

_NS = uuid.UUID("6b1c5b52-0f0e-4d0c-9a53-2f8b2a1c3d40")


@dataclass
class _Sim:
    activity: float = 0.0  # smoothed load in [0, 1]
    heat: float = 0.0  # slower-smoothed load in [0, 1], drives the temperatures
    energy_mj: float = 0.0
    busy_s: float = 0.0  # integral of activity over time: what GPM's two-sample counters measure
    at: float | None = None


@dataclass(frozen=True)
class _GpmSample:
    gpu: int
    at: float
    busy_s: float


class SimulatedGpus:
    """GpuBackend with plausible values: busy GPUs follow load(), idle ones cool down."""

    def __init__(
        self,
        count: int,
        load: Callable[[], float],
        processes: Callable[[int], list[tuple[int, int]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if count < 0:
            raise ValueError(f"simulated GPU count {count}: must be >= 0")
        self._count = count
        self._load = load
        self._processes = processes  # gpu -> [(pid, used bytes)]; None: every GPU is busy with load()
        self._clock = clock
        self._lock = threading.Lock()
        self._sims = [_Sim(energy_mj=1.0e8 * (i + 1)) for i in range(count)]
        self._faults: dict[int, GpuErrorKind] = {}
        self._xids: queue.Queue[XidEvent] = queue.Queue()

    # --- fault injection for demos and alert tests ----------------------------------------------

    def inject_xid(self, gpu: int, xid: int) -> None:
        """Report an XID on `gpu` to whoever waits in wait_xid()."""
        self._xids.put(XidEvent(gpu=gpu, xid=xid))

    def set_fault(self, gpu: int, kind: GpuErrorKind | None) -> None:
        """Make every read of `gpu` fail with `kind` (LOST: fell off the bus); None heals it."""
        with self._lock:
            if kind is None:
                self._faults.pop(gpu, None)
            else:
                self._faults[gpu] = kind

    # --- GpuBackend --------------------------------------------------------------------------------

    def device_count(self) -> int:
        return self._count

    def uuid(self, gpu: int) -> str:
        self._check(gpu)
        return f"GPU-{uuid.uuid5(_NS, f'simulated-{gpu}')}"

    def name(self, gpu: int) -> str:
        self._check(gpu)
        return MODEL

    def pci_bus_id(self, gpu: int) -> str:
        self._check(gpu)
        return f"00000000:{0x17 + 0x10 * gpu:02X}:00.0"

    def minor_number(self, gpu: int) -> int:
        self._check(gpu)
        return gpu

    def utilization(self, gpu: int) -> Utilization:
        sim = self._advance(gpu)
        busy = round(100.0 * sim.activity * (0.94 + 0.02 * (gpu % 4)))
        return Utilization(gpu=float(busy), memory=float(round(busy * 0.55)))

    def encoder_utilization(self, gpu: int) -> float:
        self._check(gpu)
        return 0.0

    def decoder_utilization(self, gpu: int) -> float:
        self._check(gpu)
        return 0.0

    def memory(self, gpu: int) -> MemoryInfo:
        sim = self._advance(gpu)
        held = sum(used for _pid, used in self._procs(gpu))
        used_mib = min(4 + held // MIB + round(ACTIVATIONS_MIB * sim.activity), TOTAL_MIB - RESERVED_MIB)
        free_mib = TOTAL_MIB - RESERVED_MIB - used_mib
        return MemoryInfo(total=TOTAL_MIB * MIB, used=used_mib * MIB, free=free_mib * MIB, reserved=RESERVED_MIB * MIB)

    def gpu_temperature(self, gpu: int) -> float:
        return float(round(31 + 0.5 * (gpu % 3) + 38 * self._advance(gpu).heat))

    def memory_temperature(self, gpu: int) -> float:
        return float(round(34 + 0.5 * (gpu % 3) + 44 * self._advance(gpu).heat))

    def power_mw(self, gpu: int) -> float:
        return float(round(1000 * self._watts(self._advance(gpu))))

    def total_energy_mj(self, gpu: int) -> float:
        return float(int(self._advance(gpu).energy_mj))

    def sm_clock_mhz(self, gpu: int) -> float:
        boost = min(1.0, 4.0 * self._advance(gpu).activity)
        return float(round(IDLE_SM_MHZ + (MAX_SM_MHZ - IDLE_SM_MHZ) * boost))

    def mem_clock_mhz(self, gpu: int) -> float:
        self._check(gpu)
        return MEM_MHZ

    def pcie_replay_count(self, gpu: int) -> float:
        self._check(gpu)
        return 0.0

    def compute_processes(self, gpu: int) -> list[GpuProcess]:
        self._check(gpu)
        return [GpuProcess(pid=pid, used_memory=used) for pid, used in self._procs(gpu)]

    def driver_version(self) -> str:
        return DRIVER

    def remapped_rows(self, gpu: int) -> RemappedRows:
        self._check(gpu)
        return RemappedRows(correctable=0, uncorrectable=0, pending=False, failed=False)

    def nvlink_links(self, gpu: int) -> int:
        self._check(gpu)
        return NVLINK_LINKS

    def mig_devices(self, gpu: int) -> list[MigDevice]:
        self._check(gpu)
        raise GpuBackendError("MIG is disabled", GpuErrorKind.NOT_SUPPORTED)

    def gpm_supported(self, gpu: int) -> bool:
        self._check(gpu)
        return True

    def gpm_sample(self, gpu: int) -> object:
        sim = self._advance(gpu)
        return _GpmSample(gpu=gpu, at=sim.at or 0.0, busy_s=sim.busy_s)

    def gpm_metrics(self, older: object, newer: object) -> GpmValues:
        """What NVML derives from two samples: the busy fraction between them, scaled per field."""
        if not isinstance(older, _GpmSample) or not isinstance(newer, _GpmSample) or older.gpu != newer.gpu:
            raise GpuBackendError("GPM samples of different GPUs", GpuErrorKind.OTHER)
        elapsed = newer.at - older.at
        if elapsed <= 0:
            raise GpuBackendError("GPM samples too close together", GpuErrorKind.OTHER)
        busy = min(max((newer.busy_s - older.busy_s) / elapsed, 0.0), 1.0)
        pcie = PCIE_IDLE_MIB_S + PCIE_BUSY_MIB_S * busy
        return GpmValues(
            graphics_util=100.0 * busy, sm_util=100.0 * SM_PER_LOAD * busy,
            sm_occupancy=100.0 * OCCUPANCY_PER_LOAD * busy, tensor_util=100.0 * TENSOR_PER_LOAD * busy,
            dram_bw_util=100.0 * DRAM_PER_LOAD * busy, pcie_tx_mib_s=pcie, pcie_rx_mib_s=pcie * 0.8,
            nvlink_tx_mib_s=NVLINK_BUSY_MIB_S * busy, nvlink_rx_mib_s=NVLINK_BUSY_MIB_S * busy,
        )

    def gpm_free(self, sample: object) -> None:
        return None

    def wait_xid(self, timeout_seconds: float) -> XidEvent | None:
        try:
            return self._xids.get(timeout=max(timeout_seconds, 0.0))
        except queue.Empty:
            return None

    def close(self) -> None:
        return None

    # --- the simulation --------------------------------------------------------------------------

    def _check(self, gpu: int) -> None:
        if not 0 <= gpu < self._count:
            raise GpuBackendError(f"GPU {gpu}: Invalid Argument (node has {self._count})")
        kind = self._faults.get(gpu)
        if kind is not None:
            raise GpuBackendError(f"GPU {gpu}: {'GPU is lost' if kind == GpuErrorKind.LOST else 'Unknown Error'}",
                                  kind)

    def _procs(self, gpu: int) -> list[tuple[int, int]]:
        return self._processes(gpu) if self._processes is not None else []

    @staticmethod
    def _watts(sim: _Sim) -> float:
        return IDLE_W + (MAX_W - IDLE_W) * sim.activity

    def _target(self, gpu: int) -> float:
        if self._processes is not None and not self._processes(gpu):
            return 0.0
        try:
            value = float(self._load())
        except Exception as exc:  # a demo load source must never break the exporter
            logger.debug("simulated load failed: {}", exc)
            return 0.0
        return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0

    def _advance(self, gpu: int) -> _Sim:
        """Move GPU `gpu` forward to now: smooth towards the load, integrate power into energy."""
        self._check(gpu)
        now = self._clock()
        with self._lock:
            sim = self._sims[gpu]
            if sim.at is not None and now - sim.at < 0.01:
                return _Sim(sim.activity, sim.heat, sim.energy_mj, sim.busy_s, sim.at)
        target = self._target(gpu)
        with self._lock:
            sim = self._sims[gpu]
            dt = 0.0 if sim.at is None else max(now - sim.at, 0.0)
            watts_before, activity_before = self._watts(sim), sim.activity
            sim.activity += (target - sim.activity) * (1 - math.exp(-dt / UTIL_TAU_S))
            sim.heat += (target - sim.heat) * (1 - math.exp(-dt / TEMP_TAU_S))
            sim.energy_mj += (watts_before + self._watts(sim)) / 2 * dt * 1000.0
            sim.busy_s += (activity_before + sim.activity) / 2 * dt
            sim.at = now
            return _Sim(sim.activity, sim.heat, sim.energy_mj, sim.busy_s, sim.at)


class StubLoad:
    """load() for SimulatedGpus: the stub server's `vllm:num_requests_running` over `full_at`, cached."""

    def __init__(
        self,
        metrics_url: str,
        full_at: float = 8.0,
        cache_seconds: float = 1.0,
        timeout: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = metrics_url
        self._full_at = full_at
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._client = httpx.Client(timeout=timeout)
        self._lock = threading.Lock()
        self._value = 0.0
        self._at: float | None = None

    def __call__(self) -> float:
        with self._lock:
            now = self._clock()
            if self._at is None or now - self._at >= self._cache_seconds:
                self._value = self._fetch()
                self._at = self._clock()
            return self._value

    def _fetch(self) -> float:
        try:
            response = self._client.get(self._url)
            response.raise_for_status()
        except httpx.HTTPError:
            return 0.0  # the server is down or starting: its GPUs are idle
        running = running_requests(response.text)
        return min(running / self._full_at, 1.0) if self._full_at > 0 else 0.0

    def close(self) -> None:
        self._client.close()


def running_requests(exposition: str) -> float:
    """Sum of `vllm:num_requests_running` over its label sets in a text exposition (0 when absent)."""
    total = 0.0
    name = "vllm:num_requests_running"
    for line in exposition.splitlines():
        if not line.startswith(name) or line[len(name): len(name) + 1] not in ("{", " "):
            continue
        fields = line.rsplit("}", 1)[-1].split() if "{" in line else line.split()[1:]
        try:
            value = float(fields[0])
        except (IndexError, ValueError):
            continue
        if math.isfinite(value):
            total += value
    return total
