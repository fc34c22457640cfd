"""The daemon's families: event counters and histograms from DaemonMetrics, gauges from SnapshotCollector."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from exporter_watchdog import __version__
from exporter_watchdog.core.model import ALL_PHASES, Job, JobSource, Owner, Phase, Snapshot, YieldReason
from exporter_watchdog.metrics.daemon import (
    YIELD_BUCKETS,
    DaemonMetrics,
    SnapshotCollector,
    snapshot_owners,
)


def snapshot(**kw: object) -> Snapshot:
    base: dict[str, object] = dict(
        node="vm1", phase=Phase.SERVING, node_gpus=4, claimed_gpus=(2, 3),
        gpu_owner={0: Owner.SLURM, 1: Owner.FREE, 2: Owner.WATCHDOG, 3: Owner.WATCHDOG},
        jobs=(Job("11", frozenset({0}), 1.0), Job("12", frozenset(), 2.0),
              Job("13", frozenset({1}), 3.0, source=JobSource.PROLOG)),
        profile="glm-4.7-flash", model="zai-org/GLM-4.7-Flash", server_pid=4242, server_ready=True,
        server_started_at=1000.0, harvested_gpu_seconds=7200.0, idle_gpu_seconds=9000.0,
    )
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_snapshot_families() -> None:
    registry = CollectorRegistry()
    current = [snapshot()]
    registry.register(SnapshotCollector(lambda: current[0], clock=lambda: 1090.5))
    get = registry.get_sample_value
    assert get("exporter_watchdog_build_info", {"version": __version__}) == 1
    for phase in ALL_PHASES:
        assert get("exporter_watchdog_state", {"state": phase.value}) == (1 if phase == Phase.SERVING else 0)
    assert get("exporter_watchdog_claimed_gpus") == 2
    assert get("exporter_watchdog_slurm_jobs") == 2  # the prolog request is not a running job yet
    assert get("exporter_watchdog_server_up") == 1
    assert get("exporter_watchdog_server_ready") == 1
    assert get("exporter_watchdog_server_uptime_seconds") == pytest.approx(90.5)
    assert get("exporter_watchdog_harvested_gpu_seconds_total") == 7200
    assert get("exporter_watchdog_idle_gpu_seconds_total") == 9000
    assert get("exporter_watchdog_active_profile_info", {"profile": "glm-4.7-flash",
                                                         "model": "zai-org/GLM-4.7-Flash"}) == 1
    types = {m.name: m.type for m in registry.collect()}
    assert types["exporter_watchdog_harvested_gpu_seconds"] == "counter"
    assert types["exporter_watchdog_idle_gpu_seconds"] == "counter"
    assert types["exporter_watchdog_state"] == "gauge"
    assert "exporter_watchdog_gpu_owner" not in types  # GpuCollector owns that family

    current[0] = snapshot(phase=Phase.BACKOFF, server_pid=None, server_ready=False, claimed_gpus=())
    assert get("exporter_watchdog_state", {"state": "backoff"}) == 1
    assert get("exporter_watchdog_state", {"state": "serving"}) == 0
    assert get("exporter_watchdog_server_up") == 0
    assert get("exporter_watchdog_server_uptime_seconds") == 0
    assert get("exporter_watchdog_claimed_gpus") == 0


def test_snapshot_owners_feeds_the_gpu_collector() -> None:
    owners = snapshot_owners(lambda: snapshot())
    assert dict(owners()) == {0: "slurm", 1: "free", 2: "watchdog", 3: "watchdog"}


def test_daemon_metrics() -> None:
    registry = CollectorRegistry()
    m = DaemonMetrics(registry)
    get = registry.get_sample_value
    for reason in YieldReason:
        assert get("exporter_watchdog_yields_total", {"reason": reason.value}) == 0  # present before the first
    m.job_seen()
    m.job_seen()
    m.job_conflict()
    m.yielded(YieldReason.JOB, 0.004)
    m.yielded(YieldReason.GPU_PROCESS, None)
    m.yielded(YieldReason.PROLOG, -1.0)  # clock skew clamps to 0
    m.detected(0.0007)
    m.slurm_query(0.03, ok=True)
    m.slurm_query(2.0, ok=False)
    m.server_restarted()
    assert get("exporter_watchdog_jobs_seen_total") == 2
    assert get("exporter_watchdog_job_conflicts_total") == 1
    assert get("exporter_watchdog_yields_total", {"reason": "job"}) == 1
    assert get("exporter_watchdog_yields_total", {"reason": "gpu_process"}) == 1
    assert get("exporter_watchdog_yield_latency_seconds_count") == 2
    assert get("exporter_watchdog_yield_latency_seconds_bucket", {"le": "0.001"}) == 1
    assert get("exporter_watchdog_yield_latency_seconds_bucket", {"le": "0.005"}) == 2
    assert get("exporter_watchdog_yield_latency_seconds_bucket", {"le": "60.0"}) == 2
    assert YIELD_BUCKETS[0] == 0.001 and YIELD_BUCKETS[-1] == 60
    assert get("exporter_watchdog_detection_latency_seconds_bucket", {"le": "0.001"}) == 1
    assert get("exporter_watchdog_slurm_query_duration_seconds_count") == 2
    assert get("exporter_watchdog_slurm_query_errors_total") == 1
    assert get("exporter_watchdog_server_restarts_total") == 1
    types = {mf.name: mf.type for mf in registry.collect()}
    assert types["exporter_watchdog_yield_latency_seconds"] == "histogram"
    assert types["exporter_watchdog_detection_latency_seconds"] == "histogram"
    assert types["exporter_watchdog_slurm_query_duration_seconds"] == "histogram"
    assert types["exporter_watchdog_yields"] == "counter"
