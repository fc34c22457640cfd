"""Supervises cloudflared like the server: own session, record for orphan clean-up, bounded log, /ready.

A second instance of the server's Supervisor does the process work (and so brings its guarantees);
this class adds what a connector needs: a stop that only sends SIGTERM (cloudflared unregisters at
once and drains on its own; a second signal would cut the drain short), a kill at the end of the grace
period, and readiness from cloudflared's `/ready`.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from exporter_watchdog.act.health import HealthProbe
from exporter_watchdog.act.supervisor import Supervisor
from exporter_watchdog.act.tunnel.launch import ConnectorLaunch
from exporter_watchdog.core.model import TunnelObs

# After the grace period cloudflared exits by itself; this much later it is killed.
KILL_AFTER_GRACE = 1.0


@dataclass
class _Stopping:
    pid: int
    deadline: float  # monotonic: SIGKILL from here on


class Connector:
    """One connector at a time; driven by the daemon loop's thread (start, stop, observe, close)."""

    def __init__(
        self,
        launch: Callable[[], ConnectorLaunch],
        supervisor: Supervisor,
        probe: HealthProbe,
        *,
        grace_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._launch = launch
        self._supervisor = supervisor
        self._probe = probe
        self._grace = grace_seconds
        self._clock = clock
        self._stopping: _Stopping | None = None
        self._start_failed: str | None = None
        self.starts = 0
        self.restarts = 0  # starts after an unexpected exit
        self._crashed_since_start = False

    @property
    def pid(self) -> int | None:
        return self._supervisor.pid

    @property
    def stopping(self) -> bool:
        return self._stopping is not None

    def cleanup_orphan(self) -> int:
        """Stop a connector a killed daemon left behind (its record names it)."""
        return self._supervisor.cleanup_orphan()

    def start(self) -> bool:
        """Spawn cloudflared; a failure is reported as an exit by the next observe() (then backoff)."""
        if self._stopping is not None or self._supervisor.pid is not None:
            return False
        try:
            launch = self._launch()
            self._supervisor.start(launch.argv, launch.env)
        except Exception as exc:  # binary missing, unreadable config: the core backs off and retries
            self._start_failed = str(exc) if not isinstance(exc, OSError) else f"{exc.strerror or exc}"
            logger.error("cannot start the tunnel connector: {}", self._start_failed)
            return False
        if self.starts and self._crashed_since_start:
            self.restarts += 1
        self.starts += 1
        self._crashed_since_start = False
        self._probe.watch(launch.ready_url)
        logger.info("tunnel connector started: pid {}", self._supervisor.pid)
        return True

    def stop(self) -> None:
        """SIGTERM the connector's group once and return at once; observe() kills it after the grace period."""
        self._probe.watch(None)
        pid = self._supervisor.pid
        if self._stopping is not None:
            return
        if pid is None:
            if self._supervisor.poll().running:
                # The leader is gone, something of its group is not: the next observe() stops it, so
                # a server stop that follows in this step does not wait for it.
                self._stopping = _Stopping(0, self._clock())
            return
        try:
            os.killpg(pid, signal.SIGTERM)  # started with setsid(): its pid is its group's id
        except ProcessLookupError:
            pass
        self._stopping = _Stopping(pid, self._clock() + self._grace + KILL_AFTER_GRACE)
        logger.info("tunnel connector pid {}: SIGTERM (it unregisters, then drains for up to {:g} s)",
                    pid, self._grace)

    def observe(self) -> TunnelObs:
        """The connector right now; finishes a stop (reaps, or kills past the grace period)."""
        poll = self._supervisor.poll()
        stopping = self._stopping
        if stopping is not None:
            if poll.running and self._clock() >= stopping.deadline:
                logger.warning("tunnel connector pid {} still runs after its grace period: killing it", stopping.pid)
                self._supervisor.stop(term_timeout=0.0)
                poll = self._supervisor.poll()
            if not poll.running:
                logger.info("tunnel connector pid {} has stopped", stopping.pid)
                self._stopping = None
                return TunnelObs(enabled=True)
            return TunnelObs(enabled=True, running=True, stopping=True, pid=stopping.pid)
        crashed = bool(poll.exited) or self._start_failed is not None
        if crashed:
            if poll.exited:
                logger.warning("tunnel connector exited on its own (status {})", poll.exit_code)
            self._start_failed = None
            self._crashed_since_start = True
            self._probe.watch(None)
        running = bool(poll.running)
        return TunnelObs(enabled=True, running=running, ready=running and self._probe.ready and not crashed,
                         crashed=crashed, pid=poll.pid)

    def close(self, timeout: float | None = None) -> None:
        """At the daemon's exit: whatever runs is stopped (a drain in progress gets the rest of its time)."""
        stopping = self._stopping
        if stopping is not None:
            deadline = stopping.deadline if timeout is None else min(stopping.deadline, self._clock() + timeout)
            while self._supervisor.poll().running and self._clock() < deadline:
                time.sleep(0.05)
            self._supervisor.stop(term_timeout=0.0)
            self._stopping = None
        elif self._supervisor.pid is not None or self._supervisor.poll().running:
            self._supervisor.stop(term_timeout=self._grace + KILL_AFTER_GRACE if timeout is None else timeout)
        self._probe.close()
