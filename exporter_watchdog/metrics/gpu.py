"""DCGM-compatible GPU families read through a GpuBackend, plus per-GPU health and ownership."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from loguru import logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter_watchdog.act.procs import read_cgroup as read_proc_cgroup
from exporter_watchdog.metrics.nvml import GpuBackend, GpuBackendError, GpuProcess, XidEvent
from exporter_watchdog.metrics.ownership import CgroupReader, GpuOccupants, classify_processes

PREFIX = "exporter_watchdog"
MIB = 1024 * 1024
# dcgm-exporter's label set, in its order; Grafana's DCGM dashboard keys on `gpu` and `Hostname`.
LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")
OWNERS = ("free", "watchdog", "slurm")

# name -> (help, type). Counters keep dcgm-exporter's names: no `_total`, which dashboards query as is.
DCGM_FAMILIES: dict[str, tuple[str, str]] = {
    "DCGM_FI_DEV_SM_CLOCK": ("SM clock frequency (in MHz).", "gauge"),
    "DCGM_FI_DEV_MEM_CLOCK": ("Memory clock frequency (in MHz).", "gauge"),
    "DCGM_FI_DEV_MEMORY_TEMP": ("Memory temperature (in C).", "gauge"),
    "DCGM_FI_DEV_GPU_TEMP": ("GPU temperature (in C).", "gauge"),
    "DCGM_FI_DEV_POWER_USAGE": ("Power draw (in W).", "gauge"),
    "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": ("Total energy consumption since boot (in mJ).", "counter"),
    "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": ("Total number of PCIe retries.", "counter"),
    "DCGM_FI_DEV_GPU_UTIL": ("GPU utilization (in %).", "gauge"),
    "DCGM_FI_DEV_MEM_COPY_UTIL": ("Memory utilization (in %).", "gauge"),
    "DCGM_FI_DEV_ENC_UTIL": ("Encoder utilization (in %).", "gauge"),
    "DCGM_FI_DEV_DEC_UTIL": ("Decoder utilization (in %).", "gauge"),
    "DCGM_FI_DEV_XID_ERRORS": ("Value of the last XID error encountered.", "gauge"),
    "DCGM_FI_DEV_FB_FREE": ("Framebuffer memory free (in MiB).", "gauge"),
    "DCGM_FI_DEV_FB_USED": ("Framebuffer memory used (in MiB).", "gauge"),
    "DCGM_FI_DEV_FB_RESERVED": ("Framebuffer memory reserved (in MiB).", "gauge"),
}


def _utilization(b: GpuBackend, gpu: int) -> dict[str, float]:
    u = b.utilization(gpu)
    return {"DCGM_FI_DEV_GPU_UTIL": u.gpu, "DCGM_FI_DEV_MEM_COPY_UTIL": u.memory}


def _memory(b: GpuBackend, gpu: int) -> dict[str, float]:
    m = b.memory(gpu)
    out = {"DCGM_FI_DEV_FB_USED": float(m.used // MIB), "DCGM_FI_DEV_FB_FREE": float(m.free // MIB)}
    if m.reserved is not None:
        out["DCGM_FI_DEV_FB_RESERVED"] = float(m.reserved // MIB)
    return out


# One reader per NVML call: a NOT_SUPPORTED answer is remembered per GPU and that call is not made again.
_READERS: tuple[tuple[str, Callable[[GpuBackend, int], dict[str, float]]], ...] = (
    ("utilization", _utilization),
    ("encoder", lambda b, g: {"DCGM_FI_DEV_ENC_UTIL": b.encoder_utilization(g)}),
    ("decoder", lambda b, g: {"DCGM_FI_DEV_DEC_UTIL": b.decoder_utilization(g)}),
    ("memory", _memory),
    ("gpu_temp", lambda b, g: {"DCGM_FI_DEV_GPU_TEMP": b.gpu_temperature(g)}),
    ("memory_temp", lambda b, g: {"DCGM_FI_DEV_MEMORY_TEMP": b.memory_temperature(g)}),
    ("power", lambda b, g: {"DCGM_FI_DEV_POWER_USAGE": b.power_mw(g) / 1000.0}),
    ("energy", lambda b, g: {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": b.total_energy_mj(g)}),
    ("sm_clock", lambda b, g: {"DCGM_FI_DEV_SM_CLOCK": b.sm_clock_mhz(g)}),
    ("mem_clock", lambda b, g: {"DCGM_FI_DEV_MEM_CLOCK": b.mem_clock_mhz(g)}),
    ("pcie_replay", lambda b, g: {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER": b.pcie_replay_count(g)}),
)


class XidWatcher:
    """A thread that waits on the backend's XID events and keeps the last XID and counts per GPU."""

    def __init__(self, backend: GpuBackend, poll_seconds: float = 1.0) -> None:
        self._backend = backend
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> XidWatcher:
        self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it (at most one poll interval)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
        """(last XID per GPU, count per (GPU, XID)), copied."""
        with self._lock:
            return dict(self._last), dict(self._counts)

    def _record(self, event: XidEvent) -> None:
        with self._lock:
            self._last[event.gpu] = event.xid
            key = (event.gpu, event.xid)
            self._counts[key] = self._counts.get(key, 0) + 1
        logger.warning("GPU {}: XID {}", event.gpu, event.xid)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                event = self._backend.wait_xid(self._poll)
            except GpuBackendError as exc:
                if exc.not_supported:
                    logger.info("XID events unavailable: {}", exc)
                    return
                logger.warning("XID wait failed (retrying in {:.0f} s): {}", backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            except Exception:
                logger.exception("XID wait failed (retrying in {:.0f} s)", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            if event is not None:
                self._record(event)


@dataclass
class _GpuReading:
    labels: dict[str, str]  # shared by every sample of this GPU in one pass (read-only)
    values: dict[str, float]
    occupants: GpuOccupants | None  # None when the process list is not supported


@dataclass
class _GpuHealth:
    up: bool = True
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    identity: tuple[str, ...] | None = None


class GpuCollector(Collector):
    """The DCGM families for every GPU the backend shows; a sick GPU costs only its own series."""

    def __init__(
        self,
        backend: GpuBackend,
        hostname: str,
        owners: Callable[[], Mapping[int, str]] | None = None,
        server_pids: Callable[[], set[int]] | None = None,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        xids: XidWatcher | None = None,
        read_cgroup: CgroupReader = read_proc_cgroup,
    ) -> None:
        self._backend = backend
        self._hostname = hostname
        self._owners = owners
        self._server_pids = server_pids
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._xids = xids
        self._read_cgroup = read_cgroup
        self._lock = threading.Lock()  # one NVML pass at a time; scrapes that wait get its result
        self._cached: list[Metric] | None = None
        self._cached_at = 0.0
        self._health: dict[int, _GpuHealth] = {}
        self._errors = 0
        self._passes = 0
        self._owners_failed = False

    @property
    def passes(self) -> int:
        """How many NVML passes have run (scrapes answered from the cache do not count)."""
        return self._passes

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            now = self._clock()
            if self._cached is None or now - self._cached_at >= self._cache_seconds:
                self._cached = self._gather()
                self._cached_at = self._clock()
            return list(self._cached)

    # --- one pass -------------------------------------------------------------------------------

    def _gather(self) -> list[Metric]:
        started = time.perf_counter()
        self._passes += 1
        readings: dict[int, _GpuReading] = {}
        try:
            server_pids = self._call_server_pids()
            for gpu in self._gpu_indices():
                reading = self._read_gpu(gpu, server_pids)
                if reading is not None:
                    readings[gpu] = reading
            metrics = self._render(readings)
        except Exception:  # a bug here must not take /metrics down: report it as a failed pass
            logger.exception("GPU collection failed")
            self._errors += 1
            metrics = []
        duration = GaugeMetricFamily(
            f"{PREFIX}_gpu_collect_duration_seconds", "Duration of the last NVML pass.",
            value=time.perf_counter() - started,
        )
        errors = CounterMetricFamily(
            f"{PREFIX}_gpu_collect_errors", "NVML reads that failed (per GPU and pass).", value=self._errors
        )
        return [*metrics, duration, errors]

    def _gpu_indices(self) -> list[int]:
        try:
            count = self._backend.device_count()
        except GpuBackendError as exc:
            # Keep reporting the GPUs we knew, as down, rather than dropping them from view.
            logger.warning("NVML device count failed: {}", exc)
            self._errors += 1
            for health in self._health.values():
                health.up = False
            return []
        # A GPU that vanished from the count stays listed as down: "fell off the bus" must be visible.
        for gpu, health in self._health.items():
            if gpu >= count and health.up:
                logger.warning("GPU {} no longer listed by NVML", gpu)
                health.up = False
        return list(range(count))

    def _call_server_pids(self) -> set[int]:
        if self._server_pids is None:
            return set()
        try:
            return set(self._server_pids())
        except Exception:
            logger.exception("server_pids() failed")
            return set()

    def _read_gpu(self, gpu: int, server_pids: set[int]) -> _GpuReading | None:
        health = self._health.setdefault(gpu, _GpuHealth())
        b = self._backend
        try:
            identity = health.identity
            if identity is None:
                try:
                    device = f"nvidia{b.minor_number(gpu)}"
                except GpuBackendError as exc:
                    if not exc.not_supported:
                        raise
                    device = f"nvidia{gpu}"
                identity = (str(gpu), b.uuid(gpu), b.pci_bus_id(gpu), device, b.name(gpu), self._hostname)
                health.identity = identity
            values: dict[str, float] = {}
            for key, read in _READERS:
                if key in health.unsupported:
                    continue
                try:
                    values.update(read(b, gpu))
                except GpuBackendError as exc:
                    if not exc.not_supported:
                        raise
                    health.unsupported.add(key)
            occupants = None
            if "processes" not in health.unsupported:
                try:
                    procs: list[GpuProcess] = b.compute_processes(gpu)
                    occupants = classify_processes(procs, server_pids, self._read_cgroup)
                except GpuBackendError as exc:
                    if not exc.not_supported:
                        raise
                    health.unsupported.add("processes")
        except Exception as exc:
            self._errors += 1
            lost = isinstance(exc, GpuBackendError) and exc.lost
            if health.up or lost != health.lost:
                logger.warning("GPU {}: {}{}", gpu, "lost: " if lost else "", exc)
            # Forget what we knew: the board may come back as another one (reset, hot swap).
            self._health[gpu] = _GpuHealth(up=False, lost=lost)
            return None
        if not health.up:
            logger.info("GPU {}: readable again", gpu)
        health.up, health.lost = True, False
        return _GpuReading(labels=dict(zip(LABELS, identity, strict=True)), values=values, occupants=occupants)

    # --- render ---------------------------------------------------------------------------------

    def _render(self, readings: dict[int, _GpuReading]) -> list[Metric]:
        out: list[Metric] = []
        last_xid: dict[int, int] = {}
        xid_counts: dict[tuple[int, int], int] = {}
        if self._xids is not None:
            last_xid, xid_counts = self._xids.snapshot()
        for name, (doc, kind) in DCGM_FAMILIES.items():
            family = Metric(name, doc, kind)
            for gpu, reading in sorted(readings.items()):
                if name == "DCGM_FI_DEV_XID_ERRORS":
                    if self._xids is not None:
                        family.add_sample(name, reading.labels, float(last_xid.get(gpu, 0)))
                elif name in reading.values:
                    family.add_sample(name, reading.labels, reading.values[name])
            if family.samples:
                out.append(family)

        up = GaugeMetricFamily(f"{PREFIX}_gpu_up", "1 when NVML answered for the GPU.", labels=["gpu"])
        lost = GaugeMetricFamily(f"{PREFIX}_gpu_lost", "1 when NVML says the GPU is lost.", labels=["gpu"])
        for gpu, health in sorted(self._health.items()):
            up.add_metric([str(gpu)], 1.0 if health.up else 0.0)
            lost.add_metric([str(gpu)], 1.0 if health.lost else 0.0)
        out += [up, lost]

        if self._xids is not None:
            xid_total = CounterMetricFamily(
                f"{PREFIX}_gpu_xid_errors", "XID errors reported by the driver.", labels=["gpu", "xid"]
            )
            for (gpu, xid), count in sorted(xid_counts.items()):
                xid_total.add_metric([str(gpu), str(xid)], float(count))
            out.append(xid_total)

        foreign = GaugeMetricFamily(
            f"{PREFIX}_gpu_foreign_processes",
            "Processes on the GPU that are neither the watchdog's server nor a Slurm job's.", labels=["gpu"],
        )
        for gpu, reading in sorted(readings.items()):
            if reading.occupants is not None:
                foreign.add_metric([str(gpu)], float(len(reading.occupants.foreign)))
        out.append(foreign)
        out.append(self._owner_family(readings))
        return out

    def _owner_family(self, readings: dict[int, _GpuReading]) -> Metric:
        known: dict[int, str] = {}
        if self._owners is not None:
            try:
                known = {int(g): str(getattr(o, "value", o)) for g, o in self._owners().items()}
                self._owners_failed = False
            except Exception:
                if not self._owners_failed:
                    logger.exception("owners() failed; deriving GPU owners from processes")
                self._owners_failed = True
        owners: dict[int, str] = dict(known)
        for gpu, reading in readings.items():
            if gpu in owners:
                continue
            # Without the daemon's view, say what the process list shows.
            occ = reading.occupants
            owners[gpu] = "slurm" if occ and occ.slurm else "watchdog" if occ and occ.server else "free"
        family = GaugeMetricFamily(
            f"{PREFIX}_gpu_owner", "1 for the current owner of each GPU.", labels=["gpu", "owner"]
        )
        for gpu in sorted(owners):
            for candidate in OWNERS:
                family.add_metric([str(gpu), candidate], 1.0 if owners[gpu] == candidate else 0.0)
        return family
