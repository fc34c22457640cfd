"""DCGM-compatible GPU families read through a GpuBackend, plus per-GPU health, ownership and per-job memory."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from loguru import logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter_watchdog.act.procs import read_cgroup as read_proc_cgroup
from exporter_watchdog.metrics.gpm import GPM_FAMILIES, GpmSampler
from exporter_watchdog.metrics.jobs import GpuJob, JobsByGpu
from exporter_watchdog.metrics.nvml import GpuBackend, GpuBackendError, GpuProcess, MigDevice
from exporter_watchdog.metrics.ownership import CgroupReader, GpuOccupants, classify_processes
from exporter_watchdog.metrics.xid import XidWatcher

__all__ = ["DCGM_FAMILIES", "GpuCollector", "LABELS", "XidWatcher"]

PREFIX = "exporter_watchdog"
MIB = 1024 * 1024
# dcgm-exporter's label set, in its order; Grafana's DCGM dashboard keys on `gpu` and `Hostname`. A MIG
# instance adds GPU_I_PROFILE and GPU_I_ID; the driver version (a "label" field in dcgm-exporter) and
# `hpc_job` (on GPUs a job holds) follow.
LABELS = ("gpu", "UUID", "pci_bus_id", "device", "modelName", "Hostname")
DRIVER_LABEL = "DCGM_FI_DRIVER_VERSION"
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
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": ("Number of remapped rows for uncorrectable errors", "counter"),
    "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": ("Number of remapped rows for correctable errors", "counter"),
    "DCGM_FI_DEV_ROW_REMAP_FAILURE": ("Whether remapping of rows has failed", "gauge"),
    **{name: (doc, "gauge") for name, doc in GPM_FAMILIES.items()},
}
# Families a MIG instance has of its own (NVML answers these for a MIG device handle).
MIG_FAMILIES = ("DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED")


def _utilization(b: GpuBackend, gpu: int) -> dict[str, float]:
    u = b.utilization(gpu)
    return {"DCGM_FI_DEV_GPU_UTIL": u.gpu, "DCGM_FI_DEV_MEM_COPY_UTIL": u.memory}


def _memory(b: GpuBackend, gpu: int) -> dict[str, float]:
    m = b.memory(gpu)
    out = {"DCGM_FI_DEV_FB_USED": float(m.used // MIB), "DCGM_FI_DEV_FB_FREE": float(m.free // MIB)}
    if m.reserved is not None:
        out["DCGM_FI_DEV_FB_RESERVED"] = float(m.reserved // MIB)
    return out


def _remapped(b: GpuBackend, gpu: int) -> dict[str, float]:
    r = b.remapped_rows(gpu)
    return {"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": float(r.correctable),
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": float(r.uncorrectable),
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": 1.0 if r.failed else 0.0}


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
    ("remapped_rows", _remapped),
)


@dataclass
class _GpuReading:
    labels: dict[str, str]  # identity labels of this GPU (no hpc_job)
    values: dict[str, float]
    occupants: GpuOccupants | None  # None when the process list is not supported
    procs: list[GpuProcess] = field(default_factory=list)
    migs: list[MigDevice] = field(default_factory=list)


@dataclass
class _GpuHealth:
    up: bool = True
    lost: bool = False
    unsupported: set[str] = field(default_factory=set)
    identity: tuple[str, ...] | None = None


class GpuCollector(Collector):
    """The DCGM families for every GPU the backend shows; a sick GPU costs only its own series.

    Without a backend (NVML could not be loaded) it still says what the daemon knows of the node's
    `node_gpus` GPUs: each one down, and its owner."""

    def __init__(
        self,
        backend: GpuBackend | None,
        hostname: str,
        owners: Callable[[], Mapping[int, str]] | None = None,
        server_pids: Callable[[], set[int]] | None = None,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        xids: XidWatcher | None = None,
        read_cgroup: CgroupReader = read_proc_cgroup,
        node_gpus: int = 0,
        jobs: Callable[[], JobsByGpu] | None = None,
        gpm: GpmSampler | None = None,
    ) -> None:
        self._backend = backend
        self._hostname = hostname
        self._owners = owners
        self._server_pids = server_pids
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._xids = xids
        self._read_cgroup = read_cgroup
        self._node_gpus = node_gpus
        self._jobs = jobs
        self._gpm = gpm
        self._lock = threading.Lock()  # one NVML pass at a time; scrapes that wait get its result
        self._cached: list[Metric] | None = None
        self._cached_at = 0.0
        self._health: dict[int, _GpuHealth] = {}
        self._errors = 0
        self._passes = 0
        self._owners_failed = False
        self._jobs_failed = False
        self._driver: str | None = None
        self._driver_asked = False

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
            metrics = self._render(readings, self._call_jobs())
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
        if self._backend is None:
            return []
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

    def _call_jobs(self) -> JobsByGpu:
        if self._jobs is None:
            return {}
        try:
            jobs = self._jobs()
        except Exception:
            if not self._jobs_failed:
                logger.exception("jobs() failed; GPU series go without hpc_job")
            self._jobs_failed = True
            return {}
        self._jobs_failed = False
        return jobs

    def _driver_version(self, b: GpuBackend) -> str | None:
        if not self._driver_asked:
            self._driver_asked = True
            try:
                self._driver = b.driver_version()
            except GpuBackendError as exc:
                logger.info("driver version unavailable: {}", exc)
        return self._driver

    def _read_gpu(self, gpu: int, server_pids: set[int]) -> _GpuReading | None:
        health = self._health.setdefault(gpu, _GpuHealth())
        b = self._backend
        assert b is not None
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
            procs: list[GpuProcess] = []
            if "processes" not in health.unsupported:
                try:
                    procs = b.compute_processes(gpu)
                    occupants = classify_processes(procs, server_pids, self._read_cgroup)
                except GpuBackendError as exc:
                    if not exc.not_supported:
                        raise
                    health.unsupported.add("processes")
            migs: list[MigDevice] = []
            if "mig" not in health.unsupported:
                try:
                    migs = b.mig_devices(gpu)
                except GpuBackendError as exc:
                    if not exc.not_supported:
                        raise
                    health.unsupported.add("mig")  # MIG off: asked again only after the GPU is re-read
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
        labels = dict(zip(LABELS, identity, strict=True))
        driver = self._driver_version(b)
        if driver:
            labels[DRIVER_LABEL] = driver
        return _GpuReading(labels=labels, values=values, occupants=occupants, procs=procs, migs=migs)

    # --- render ---------------------------------------------------------------------------------

    @staticmethod
    def _variants(labels: dict[str, str], jobs: tuple[GpuJob, ...]) -> list[dict[str, str]]:
        """The label sets of one GPU's series: one per job holding it (as dcgm-exporter), or one without hpc_job."""
        if not jobs:
            return [labels]
        return [{**labels, "hpc_job": job.job_id} for job in jobs]

    def _render(self, readings: dict[int, _GpuReading], jobs: JobsByGpu) -> list[Metric]:
        out: list[Metric] = []
        last_xid: dict[int, int] = {}
        xid_counts: dict[tuple[int, int], int] = {}
        if self._xids is not None:
            last_xid, xid_counts = self._xids.snapshot()
        gpm = self._gpm.values() if self._gpm is not None else {}
        # Label dicts made once per pass and shared by every family: the text writer escapes each once.
        series: list[tuple[int, list[dict[str, str]], dict[str, float]]] = []
        mig_series: list[tuple[list[dict[str, str]], dict[str, float]]] = []
        for gpu, reading in sorted(readings.items()):
            values = dict(reading.values)
            values.update(gpm.get(gpu, {}))
            if self._xids is not None:
                values["DCGM_FI_DEV_XID_ERRORS"] = float(last_xid.get(gpu, 0))
            series.append((gpu, self._variants(reading.labels, jobs.get(str(gpu), ())), values))
            for mig in reading.migs:
                labels = {**reading.labels, "GPU_I_PROFILE": mig.profile, "GPU_I_ID": str(mig.gpu_instance_id)}
                key = f"{gpu}.{mig.gpu_instance_id}"
                mig_values = {"DCGM_FI_DEV_FB_USED": float(mig.memory.used // MIB),
                              "DCGM_FI_DEV_FB_FREE": float(mig.memory.free // MIB)}
                mig_series.append((self._variants(labels, jobs.get(key, ())), mig_values))
        for name, (doc, kind) in DCGM_FAMILIES.items():
            family = Metric(name, doc, kind)
            for _gpu, variants, values in series:
                value = values.get(name)
                if value is not None:
                    for labels in variants:
                        family.add_sample(name, labels, value)
            if name in MIG_FAMILIES:
                for variants, values in mig_series:
                    for labels in variants:
                        family.add_sample(name, labels, values[name])
            if family.samples:
                out.append(family)

        up = GaugeMetricFamily(f"{PREFIX}_gpu_up", "1 when NVML answered for the GPU.", labels=["gpu"])
        lost = GaugeMetricFamily(f"{PREFIX}_gpu_lost", "1 when NVML says the GPU is lost.", labels=["gpu"])
        # GPUs the node has (node.gpus) that NVML never showed are down too: the hardware view is missing.
        for gpu in sorted(set(self._health) | set(range(self._node_gpus))):
            health = self._health.get(gpu, _GpuHealth(up=False))
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
        out.append(self._memory_family(readings))
        out.append(self._owner_family(readings, jobs))
        return out

    def _memory_family(self, readings: dict[int, _GpuReading]) -> Metric:
        """GPU memory of the processes NVML lists, summed per owner and job (never per PID: bounded series)."""
        family = GaugeMetricFamily(
            f"{PREFIX}_gpu_memory_used_bytes",
            "GPU memory used by processes, per owner (watchdog, slurm, foreign) and Slurm job.",
            labels=["gpu", "owner", "hpc_job"],
        )
        for gpu, reading in sorted(readings.items()):
            occ = reading.occupants
            if occ is None:
                continue
            server = set(occ.server)
            sums: dict[tuple[str, str], float] = {}
            for proc in reading.procs:
                if proc.pid in server:
                    key = ("watchdog", "")
                elif proc.pid in occ.slurm:
                    key = ("slurm", occ.slurm[proc.pid])
                else:
                    key = ("foreign", "")
                sums[key] = sums.get(key, 0.0) + float(proc.used_memory or 0)
            for (owner, job), used in sorted(sums.items()):
                family.add_metric([str(gpu), owner, job], used)
        return family

    def _owner_family(self, readings: dict[int, _GpuReading], jobs: JobsByGpu) -> Metric:
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
        job_gpus = {int(key.split(".", 1)[0]) for key, held in jobs.items() if held}
        for gpu in sorted(set(readings) | job_gpus):
            if gpu in owners:
                continue
            # Without the daemon's view, say what the job map and the process list show.
            occ = readings[gpu].occupants if gpu in readings else None
            if gpu in job_gpus or (occ and occ.slurm):
                owners[gpu] = "slurm"
            else:
                owners[gpu] = "watchdog" if occ and occ.server else "free"
        family = GaugeMetricFamily(
            f"{PREFIX}_gpu_owner", "1 for the current owner of each GPU.", labels=["gpu", "owner"]
        )
        for gpu in sorted(owners):
            for candidate in OWNERS:
                family.add_metric([str(gpu), candidate], 1.0 if owners[gpu] == candidate else 0.0)
        return family
