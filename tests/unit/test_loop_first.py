"""LoopFirst: the daemon's loop holds /metrics workers back after a job event, never for longer than MAX_HOLD."""

from __future__ import annotations

import time

from exporter_watchdog.metrics.connections import LoopFirst


def timed_wait(gate: LoopFirst) -> float:
    started = time.monotonic()
    gate.wait()
    return time.monotonic() - started


def test_nothing_held_returns_at_once() -> None:
    assert timed_wait(LoopFirst()) < 0.05


def test_hold_for_delays_workers_until_it_expires() -> None:
    gate = LoopFirst()
    gate.hold_for(0.2)
    assert 0.15 <= timed_wait(gate) < 0.45
    assert timed_wait(gate) < 0.05  # expired: no longer held


def test_a_long_hold_is_capped() -> None:
    gate = LoopFirst()
    gate.hold_for(60)
    assert LoopFirst.MAX_HOLD - 0.05 <= timed_wait(gate) < LoopFirst.MAX_HOLD + 0.3
