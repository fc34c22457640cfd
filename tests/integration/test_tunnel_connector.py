"""The Connector on its own: real processes (tests/support/fake_cloudflared.py stands in for cloudflared)."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter_watchdog.act.health import HealthProbe
from exporter_watchdog.act.supervisor import Supervisor
from exporter_watchdog.act.tunnel.connector import Connector
from exporter_watchdog.act.tunnel.launch import ConnectorLaunch
from tests.support.daemon import pid_alive, wait_until
from tests.support.tunnel import FAKE_CLOUDFLARED
from tests.support.waiting import free_port

IGNORES_TERM = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('up', flush=True); time.sleep(120)"]


def make(tmp_path: Path, argv: list[str], grace: float, env: dict[str, str] | None = None) -> Connector:
    port = free_port()
    launch = ConnectorLaunch(
        argv=(*argv, "tunnel", "--metrics", f"127.0.0.1:{port}", "--grace-period", f"{grace}s", "run",
              "--token-file", str(tmp_path / "token")) if argv == FAKE_CLOUDFLARED else tuple(argv),
        env={**os.environ, "FAKE_CLOUDFLARED_RECORD": str(tmp_path / "record.jsonl"), **(env or {})},
        ready_url=f"http://127.0.0.1:{port}/ready", config_path=None,
    )
    (tmp_path / "token").write_text("t0ken\n")
    supervisor = Supervisor(tmp_path / "tunnel.json", tmp_path / "tunnel.log", term_timeout=grace + 1,
                            kill_timeout=5.0, marker_env="EXPORTER_WATCHDOG_TUNNEL")
    return Connector(lambda: launch, supervisor, HealthProbe(lambda: None, interval=0.1, timeout=1.0,
                                                             name="tunnel connector"), grace_seconds=grace)


@pytest.fixture
def connectors() -> Iterator[list[Connector]]:
    made: list[Connector] = []
    yield made
    for connector in made:
        connector.close(timeout=1.0)


def test_stop_returns_at_once_and_the_drain_goes_on(tmp_path: Path, connectors: list[Connector]) -> None:
    connector = make(tmp_path, FAKE_CLOUDFLARED, grace=5.0, env={"FAKE_CLOUDFLARED_DRAIN_SECONDS": "3"})
    connectors.append(connector)
    assert connector.start()
    pid = connector.pid
    assert pid is not None
    wait_until(lambda: connector.observe().ready, 20, "the connector ready")
    t0 = time.monotonic()
    connector.stop()
    took = time.monotonic() - t0
    assert took < 0.05, f"stop() took {took:.3f} s"  # SIGTERM only: the caller never waits for the drain
    obs = connector.observe()
    assert obs.running and obs.stopping and not obs.ready
    wait_until(lambda: not connector.observe().running, 20, "the drain to end")
    events = [json.loads(line) for line in (tmp_path / "record.jsonl").read_text().splitlines()]
    signals = [e for e in events if e["event"] == "signal"]
    exit_ = [e for e in events if e["event"] == "exit"][0]
    assert [e["signal"] for e in signals] == ["SIGTERM"]  # one signal: a second would cut the drain short
    assert exit_["drained"] and exit_["mono"] - signals[0]["mono"] >= 2.9
    assert not pid_alive(pid) and not (tmp_path / "tunnel.json").exists()


def test_a_connector_that_ignores_sigterm_is_killed_after_the_grace_period(
        tmp_path: Path, connectors: list[Connector]) -> None:
    connector = make(tmp_path, IGNORES_TERM, grace=0.5)
    connectors.append(connector)
    assert connector.start()
    pid = connector.pid
    assert pid is not None
    wait_until(lambda: "up" in (tmp_path / "tunnel.log").read_text(), 10, "the child to install its handler")
    connector.stop()
    assert connector.observe().stopping and pid_alive(pid)
    wait_until(lambda: not connector.observe().running, 15, "the kill after grace + 1 s")
    assert not pid_alive(pid)


def test_a_start_failure_is_reported_as_an_exit(tmp_path: Path, connectors: list[Connector]) -> None:
    connector = make(tmp_path, [str(tmp_path / "no-such-cloudflared")], grace=1.0)
    connectors.append(connector)
    assert not connector.start()
    obs = connector.observe()
    assert obs.crashed and not obs.running
    assert not connector.observe().crashed  # reported once
