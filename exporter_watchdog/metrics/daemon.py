"""The daemon's own metric families: event counters fed by the loop, gauges read from the snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter_watchdog import __version__
from exporter_watchdog.core.model import ALL_PHASES, JobSource, Snapshot, YieldReason

PREFIX = "exporter_watchdog"

# Yield latency spans a hot inotify path (ms) to a server that takes the whole SIGKILL deadline.
YIELD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
# Detection is the cgroup event -> decision step: microseconds to a slow scontrol.
DETECTION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# scontrol answers in 8-105 ms when healthy; the timeout (default 2 s) closes the range.
SLURM_QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)


class DaemonMetrics:
    """Counters and histograms the daemon loop feeds, registered into the registry it is given."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs_seen = Counter(
            f"{PREFIX}_jobs_seen", "Slurm jobs seen on this node.", registry=registry
        )
        self.job_conflicts = Counter(
            f"{PREFIX}_job_conflicts",
            "Jobs that landed on GPUs the server held (or might have: Slurm did not answer).",
            registry=registry,
        )
        self.yields = Counter(
            f"{PREFIX}_yields", "Times the server was stopped to hand GPUs back.", ["reason"],
            registry=registry,
        )
        for reason in YieldReason:
            self.yields.labels(reason.value)
        self.yield_latency = Histogram(
            f"{PREFIX}_yield_latency_seconds",
            "From the first signal of a job (cgroup event, prolog, GPU process) to the server's group gone.",
            buckets=YIELD_BUCKETS, registry=registry,
        )
        self.detection_latency = Histogram(
            f"{PREFIX}_detection_latency_seconds",
            "From a job's cgroup event to the decision about it.",
            buckets=DETECTION_BUCKETS, registry=registry,
        )
        self.server_restarts = Counter(
            f"{PREFIX}_server_restarts", "Server starts after the first one.", registry=registry
        )
        self.slurm_query_duration = Histogram(
            f"{PREFIX}_slurm_query_duration_seconds", "Duration of scontrol queries.",
            buckets=SLURM_QUERY_BUCKETS, registry=registry,
        )
        self.slurm_query_errors = Counter(
            f"{PREFIX}_slurm_query_errors", "scontrol queries that failed or timed out.", registry=registry
        )

    def job_seen(self) -> None:
        self.jobs_seen.inc()

    def job_conflict(self) -> None:
        self.job_conflicts.inc()

    def yielded(self, reason: YieldReason, latency_seconds: float | None) -> None:
        self.yields.labels(reason.value).inc()
        if latency_seconds is not None:
            self.yield_latency.observe(max(latency_seconds, 0.0))

    def detected(self, latency_seconds: float) -> None:
        self.detection_latency.observe(max(latency_seconds, 0.0))

    def slurm_query(self, duration_seconds: float, ok: bool) -> None:
        self.slurm_query_duration.observe(duration_seconds)
        if not ok:
            self.slurm_query_errors.inc()

    def server_restarted(self) -> None:
        self.server_restarts.inc()


class SnapshotCollector(Collector):
    """Gauges derived from the daemon's published snapshot; a scrape only reads."""

    def __init__(self, snapshot: Callable[[], Snapshot], clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._monotonic = monotonic

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        yield GaugeMetricFamily(
            f"{PREFIX}_loop_heartbeat_age_seconds",
            "Seconds since the daemon's loop last finished an iteration (it wakes at least every rescan).",
            value=max(self._monotonic() - snap.loop_heartbeat, 0.0),
        )
        info = GaugeMetricFamily(f"{PREFIX}_build_info", "Build information.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info

        state = GaugeMetricFamily(f"{PREFIX}_state", "1 for the daemon's current state.", labels=["state"])
        for phase in ALL_PHASES:
            state.add_metric([phase.value], 1.0 if snap.phase == phase else 0.0)
        yield state

        yield GaugeMetricFamily(
            f"{PREFIX}_claimed_gpus", "GPUs claimed for the server.", value=len(snap.claimed_gpus)
        )
        cgroup_jobs = [j for j in snap.jobs if j.source in (JobSource.CGROUP, JobSource.SQUEUE)]
        yield GaugeMetricFamily(
            f"{PREFIX}_slurm_jobs", "Slurm jobs running on this node.", value=len(cgroup_jobs)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_server_up", "1 while a server process runs.", value=1 if snap.server_pid else 0
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_server_ready", "1 while the server answers /health.", value=1 if snap.server_ready else 0
        )
        uptime = 0.0
        if snap.server_pid and snap.server_started_at is not None:
            uptime = max(self._clock() - snap.server_started_at, 0.0)
        yield GaugeMetricFamily(
            f"{PREFIX}_server_uptime_seconds", "Seconds since the current server was started.", value=uptime
        )
        yield CounterMetricFamily(
            f"{PREFIX}_harvested_gpu_seconds",
            "Claimed GPUs multiplied by serving time.", value=snap.harvested_gpu_seconds,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_idle_gpu_seconds",
            "GPUs no job held multiplied by time.", value=snap.idle_gpu_seconds,
        )
        profile = GaugeMetricFamily(
            f"{PREFIX}_active_profile_info", "The active model profile.", labels=["profile", "model"]
        )
        profile.add_metric([snap.profile, snap.model], 1)
        yield profile
        if snap.tunnel_enabled:
            yield from tunnel_families(snap)
        # exporter_watchdog_gpu_owner comes from GpuCollector (owners=snapshot_owners(...)): it sits with
        # the GPU's other series and still says something in exporter-only mode with no loop.


def snapshot_owners(snapshot: Callable[[], Snapshot]) -> Callable[[], Mapping[int, str]]:
    """The `owners` callable for GpuCollector: GPU index -> owner from the daemon's snapshot."""

    def owners() -> Mapping[int, str]:
        return {gpu: owner.value for gpu, owner in snapshot().gpu_owner.items()}

    return owners


def tunnel_families(snap: Snapshot) -> Iterable[Metric]:
    """The tunnel connector's gauges and restarts; exported only with tunnel.enabled (absent = no tunnel)."""
    yield GaugeMetricFamily(
        f"{PREFIX}_tunnel_up", "1 while the tunnel connector (cloudflared) process runs, draining included.",
        value=1 if snap.tunnel_pid else 0,
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_tunnel_ready",
        "1 while the connector's /ready answers 200: an edge connection is registered.",
        value=1 if snap.tunnel_ready else 0,
    )
    yield CounterMetricFamily(
        f"{PREFIX}_tunnel_restarts", "Connector starts after it exited on its own.", value=snap.tunnel_restarts
    )
