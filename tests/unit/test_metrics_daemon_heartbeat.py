"""The loop heartbeat age that the LoopStuck alert reads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from exporter_watchdog.core.model import Phase, Snapshot
from exporter_watchdog.metrics.daemon import SnapshotCollector


def test_heartbeat_age_counts_from_the_last_iteration() -> None:
    snap = Snapshot(node="n", phase=Phase.SERVING, node_gpus=4, claimed_gpus=(2, 3), gpu_owner={}, jobs=(),
                    profile="demo", model="demo", loop_heartbeat=100.0)
    registry = CollectorRegistry()
    now = [100.5]
    registry.register(SnapshotCollector(lambda: snap, clock=lambda: 0.0, monotonic=lambda: now[0]))
    assert registry.get_sample_value("exporter_watchdog_loop_heartbeat_age_seconds") == 0.5
    now[0] = 190.0
    assert registry.get_sample_value("exporter_watchdog_loop_heartbeat_age_seconds") == 90.0
