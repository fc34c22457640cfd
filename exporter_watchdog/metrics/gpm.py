"""Profiling fields through NVML's GPM: a background thread takes a sample per GPU each interval and keeps
the values derived from the latest two, so a scrape only copies numbers (its cost does not depend on GPM)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from exporter_watchdog.metrics.nvml import GpmValues, GpuBackend, GpuBackendError

MIB = 1024 * 1024
MB_PER_MIB = MIB / 1e6

# dcgm-exporter's names and help; units as DCGM gives them: ratios in [0, 1], bytes per second.
GPM_FAMILIES: dict[str, str] = {
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE": "Ratio of time the graphics engine is active.",
    "DCGM_FI_PROF_SM_ACTIVE": "The ratio of cycles an SM has at least 1 warp assigned.",
    "DCGM_FI_PROF_SM_OCCUPANCY": "The ratio of number of warps resident on an SM.",
    "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": "Ratio of cycles the tensor (HMMA) pipe is active.",
    "DCGM_FI_PROF_DRAM_ACTIVE": "Ratio of cycles the device memory interface is active sending or receiving data.",
    "DCGM_FI_PROF_PCIE_TX_BYTES": "The rate of data transmitted over the PCIe bus - including both protocol headers "
                                  "and data payloads - in bytes per second.",
    "DCGM_FI_PROF_PCIE_RX_BYTES": "The rate of data received over the PCIe bus - including both protocol headers "
                                  "and data payloads - in bytes per second.",
    "DCGM_FI_PROF_NVLINK_TX_BYTES": "The rate of data transmitted over NVLink, not including protocol headers, "
                                    "in bytes per second.",
    "DCGM_FI_PROF_NVLINK_RX_BYTES": "The rate of data received over NVLink, not including protocol headers, "
                                    "in bytes per second.",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": "Total number of NVLink bandwidth counters for all lanes.",
}
NVLINK_FAMILIES = frozenset({"DCGM_FI_PROF_NVLINK_TX_BYTES", "DCGM_FI_PROF_NVLINK_RX_BYTES",
                             "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"})


def dcgm_values(v: GpmValues, nvlink: bool) -> dict[str, float]:
    """NVML's GPM values (percent, MiB/s) as DCGM's fields (ratio, bytes/s); NVLink ones only where links are up."""
    out: dict[str, float] = {}
    for name, pct in (("DCGM_FI_PROF_GR_ENGINE_ACTIVE", v.graphics_util), ("DCGM_FI_PROF_SM_ACTIVE", v.sm_util),
                      ("DCGM_FI_PROF_SM_OCCUPANCY", v.sm_occupancy), ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", v.tensor_util),
                      ("DCGM_FI_PROF_DRAM_ACTIVE", v.dram_bw_util)):
        if pct is not None:
            out[name] = min(max(pct / 100.0, 0.0), 1.0)
    rates = [("DCGM_FI_PROF_PCIE_TX_BYTES", v.pcie_tx_mib_s), ("DCGM_FI_PROF_PCIE_RX_BYTES", v.pcie_rx_mib_s)]
    if nvlink:
        rates += [("DCGM_FI_PROF_NVLINK_TX_BYTES", v.nvlink_tx_mib_s),
                  ("DCGM_FI_PROF_NVLINK_RX_BYTES", v.nvlink_rx_mib_s)]
    for name, mib_s in rates:
        if mib_s is not None:
            out[name] = max(mib_s, 0.0) * MIB
    if nvlink and v.nvlink_tx_mib_s is not None and v.nvlink_rx_mib_s is not None:
        # DCGM's bandwidth total is the links' rate in MB/s, both directions.
        both = max(v.nvlink_tx_mib_s, 0.0) + max(v.nvlink_rx_mib_s, 0.0)
        out["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] = both * MB_PER_MIB
    return out


@dataclass
class _GpuGpm:
    supported: bool
    nvlink: bool
    sample: object | None = None
    values: dict[str, float] | None = None
    at: float = 0.0
    failing: bool = False


class GpmSampler:
    """Samples every GPM-capable GPU each `interval` seconds on its own thread; values() is a cheap copy."""

    def __init__(self, backend: GpuBackend, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval <= 0:
            raise ValueError(f"GPM interval {interval}: must be > 0")
        self._backend = backend
        self._interval = interval
        self._clock = clock
        self._gpus: dict[int, _GpuGpm] = {}
        self._lock = threading.Lock()  # guards the published values
        self._published: dict[int, tuple[float, dict[str, float]]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    def start(self) -> GpmSampler:
        self._thread = threading.Thread(target=self._run, name="gpm-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread and free the samples it holds."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for state in self._gpus.values():
            self._free(state)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def values(self) -> dict[int, dict[str, float]]:
        """The DCGM profiling values per GPU from the latest two samples; left out once older than 3 intervals."""
        now = self._clock()
        with self._lock:
            return {gpu: vals for gpu, (at, vals) in self._published.items() if now - at <= 3 * self._interval}

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            try:
                self.sample_once()
            except Exception:  # a bug must not end profiling for good
                logger.exception("GPM sampling failed")
            self._stop.wait(max(self._interval - (self._clock() - started), 0.0))

    def sample_once(self) -> None:
        """Take one sample of every supported GPU; derive values from it and the one before."""
        try:
            count = self._backend.device_count()
        except GpuBackendError as exc:
            logger.debug("GPM: device count failed: {}", exc)
            count = 0
            for known in self._gpus.values():
                self._free(known)
            self._gpus.clear()
        for gpu in range(count):
            state = self._gpus.get(gpu)
            if state is None:
                probed = self._probe(gpu)
                if probed is None:
                    continue
                state = self._gpus[gpu] = probed
            if state.supported:
                self._sample(gpu, state)
        self.rounds += 1

    def _probe(self, gpu: int) -> _GpuGpm | None:
        b = self._backend
        try:
            supported = b.gpm_supported(gpu)
        except GpuBackendError as exc:
            logger.debug("GPU {}: GPM support unknown: {}", gpu, exc)
            return None  # ask again next round
        nvlink = False
        if supported:
            try:
                nvlink = b.nvlink_links(gpu) > 0
            except GpuBackendError as exc:
                if exc.lost:
                    return None
            logger.info("GPU {}: profiling through GPM{}", gpu, " (with NVLink)" if nvlink else "")
        return _GpuGpm(supported=supported, nvlink=nvlink)

    def _sample(self, gpu: int, state: _GpuGpm) -> None:
        b = self._backend
        try:
            new = b.gpm_sample(gpu)
        except GpuBackendError as exc:
            self._failed(gpu, state, exc)
            return
        old, state.sample = state.sample, new
        if old is None:
            return
        try:
            values = dcgm_values(b.gpm_metrics(old, new), state.nvlink)
        except GpuBackendError as exc:
            self._failed(gpu, state, exc)
            return
        finally:
            b.gpm_free(old)
        if state.failing:
            logger.info("GPU {}: GPM samples again", gpu)
        state.failing = False
        with self._lock:
            self._published[gpu] = (self._clock(), values)

    def _failed(self, gpu: int, state: _GpuGpm, exc: GpuBackendError) -> None:
        if not state.failing:
            logger.warning("GPU {}: GPM sample failed: {}", gpu, exc)
        state.failing = True
        self._free(state)
        with self._lock:
            self._published.pop(gpu, None)  # no stale profile for a GPU we cannot read
        if exc.lost or exc.not_supported:
            self._gpus.pop(gpu, None)  # probe again: the board may come back as another one

    def _free(self, state: _GpuGpm) -> None:
        if state.sample is not None:
            self._backend.gpm_free(state.sample)
            state.sample = None
