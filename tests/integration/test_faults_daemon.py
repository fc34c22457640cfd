"""Fault table, the daemon itself: SIGKILLed in each phase, hung (SIGSTOP), its guard killed.

A real `serve --demo` daemon runs tests/support/fault_server.py as its server (a tree with a child
and a grandchild that calls setsid); every process of that tree is watched through a pidfd opened
before the fault, so "gone" is exact, not sampled.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.support.daemon import pid_alive, wait_until
from tests.support.faults import fault_daemon, pidfds, run_prolog, server_pids, wait_all_gone

# The promise: a dead daemon's server is gone within this (the guard's TERM grace, then SIGKILL).
DEATH_BOUND = 1.0


@pytest.mark.parametrize("phase", ["starting", "serving", "yielding"])
def test_daemon_sigkill_stops_the_server_within_a_second_in_each_phase(tmp_path: Path, phase: str) -> None:
    ready = tmp_path / "ready"
    flags = ["--ready-when", str(ready), "--setsid-child"]
    if phase == "yielding":
        flags += ["--ignore-term", "--term-file", str(tmp_path / "term")]  # the stop takes 30 s
    daemon = fault_daemon(tmp_path, *flags)
    try:
        if phase == "starting":
            daemon.start(wait_state="starting")
        else:
            ready.touch()
            daemon.start()
        pids = server_pids(tmp_path)
        fds = pidfds(pids)
        if phase == "yielding":
            daemon.demo_job("--gpus", "3")
            wait_until(lambda: (tmp_path / "term").exists(), 30, "the yield's SIGTERM to the server")
        killed = time.monotonic()
        daemon.signal(signal.SIGKILL)
        took = wait_all_gone(fds, killed, 10.0)
        assert took < DEATH_BOUND, f"the server outlived the daemon by {took:.3f} s"
        daemon.wait_exit(10)
        assert "the daemon is gone: stopping its server" in daemon.log()

        # Started again, the daemon serves again: a fresh server, never on the job's GPU.
        ready.touch()
        doc = daemon.start().status()
        assert doc is not None and doc["server_pid"] not in pids
        if phase == "yielding":
            assert 3 not in doc["claimed_gpus"]
    finally:
        daemon.stop()


def test_a_job_arriving_while_no_daemon_runs_never_shares_a_gpu(tmp_path: Path) -> None:
    daemon = fault_daemon(tmp_path, "--setsid-child")
    try:
        daemon.start()
        pids = server_pids(tmp_path)
        fds = pidfds(pids)
        killed = time.monotonic()
        daemon.signal(signal.SIGKILL)
        wait_all_gone(fds, killed, 10.0)
        daemon.wait_exit(10)
        # Prolog path: no daemon answers, and nothing holds GPU 3 any more.
        result, _ = run_prolog(daemon, "3", "91")
        assert result.returncode == 0, result.stderr
        assert "no daemon is running" in result.stderr and "no server is running" in result.stderr
        # Cgroup path: the job's cgroup is there when the daemon comes back.
        daemon.demo_job("--gpus", "3")
        doc = daemon.start().status()
        assert doc is not None and 3 not in doc["claimed_gpus"], doc
        assert not any(pid_alive(p) for p in pids)
    finally:
        daemon.stop()


def test_prolog_stops_a_hung_daemons_server_only_for_its_gpus(tmp_path: Path) -> None:
    daemon = fault_daemon(tmp_path, "--setsid-child")
    try:
        doc = daemon.start().status()
        assert doc is not None and doc["claimed_gpus"] == [2, 3]
        pids = server_pids(tmp_path)
        fds = pidfds(pids)
        daemon.signal(signal.SIGSTOP)
        try:
            # A job on GPUs the server does not hold: the hung daemon's server keeps running.
            result, took = run_prolog(daemon, "0", "81", "--daemon-timeout", "1", "--timeout", "20")
            assert result.returncode == 0 and "none of the job's: left alone" in result.stderr, result.stderr
            assert all(pid_alive(p) for p in pids)
            # A job on GPU 3: the Prolog stops the server itself and returns once it is gone.
            result, took = run_prolog(daemon, "3", "82", "--daemon-timeout", "1", "--timeout", "20")
            assert result.returncode == 0, result.stderr
            assert "did not answer within 1 s" in result.stderr and "stopped the server" in result.stderr
            wait_all_gone(fds, time.monotonic(), 0.001)  # already gone when the Prolog returned
            assert took < 20
            daemon.demo_job("--gpus", "3")  # Slurm starts the job
        finally:
            daemon.signal(signal.SIGCONT)
        # The daemon wakes up, sees its server gone and serves again, off the job's GPU.
        doc = daemon.wait_status(lambda d: d["state"] == "serving" and d["server_ready"]
                                 and d["server_pid"] not in pids, 60, "serving again after SIGCONT")
        assert 3 not in doc["claimed_gpus"]
    finally:
        daemon.stop()


def test_a_killed_guard_is_replaced(tmp_path: Path) -> None:
    daemon = fault_daemon(tmp_path)
    try:
        doc = daemon.start().status()
        assert doc is not None
        guard = doc["guard_pid"]
        assert guard and pid_alive(guard) and doc["stop_method"]
        os.kill(guard, signal.SIGKILL)
        doc = daemon.wait_status(lambda d: d["guard_pid"] not in (None, guard), 30, "a new guard")
        assert "guard (pid" in daemon.log() and "died" in daemon.log()
        fds = pidfds(server_pids(tmp_path))
        killed = time.monotonic()
        daemon.signal(signal.SIGKILL)
        assert wait_all_gone(fds, killed, 10.0) < DEATH_BOUND
    finally:
        daemon.stop()


def test_server_left_by_a_daemon_and_its_guard_is_stopped_by_the_next_daemon(tmp_path: Path) -> None:
    daemon = fault_daemon(tmp_path, "--setsid-child")
    try:
        doc = daemon.start().status()
        assert doc is not None
        pids = server_pids(tmp_path)
        daemon.signal(signal.SIGSTOP)  # so that it cannot replace its guard in between
        os.kill(doc["guard_pid"], signal.SIGKILL)
        daemon.signal(signal.SIGKILL)
        daemon.wait_exit(10)
        assert all(pid_alive(p) for p in pids), "with the guard dead too, the server stays until the next daemon"
        daemon.start()
        wait_until(lambda: not any(pid_alive(p) for p in pids), 30, "the orphaned server to be stopped")
        assert "left behind by an earlier daemon" in daemon.log()
    finally:
        daemon.stop()
