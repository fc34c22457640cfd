"""Helpers for the fault-table tests: a daemon serving tests/support/fault_server.py, and exact death timing."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from tests.support.daemon import EXE, DaemonProc, wait_until

FAULT_SERVER = Path(__file__).with_name("fault_server.py")


def write_profile(models: Path, name: str, pids_file: Path, *flags: str) -> None:
    """A profile `name` that runs the fault server with `flags`, writing its pids to pids_file."""
    models.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name, "description": "fault-table test server", "model": name, "served_model_name": name,
        "command": ["{python}", str(FAULT_SERVER), "--port", "{port}", "--pids-file", str(pids_file), *flags],
        "tensor_parallel": False, "startup_timeout_seconds": 120,
    }
    (models / f"{name}.yaml").write_text(yaml.safe_dump(doc))


def fault_daemon(tmp: Path, *flags: str, config: dict[str, dict[str, Any]] | None = None) -> DaemonProc:
    """A demo-node daemon (4 GPUs, claims 2) whose server is the fault server with `flags`."""
    models = tmp / "models"
    write_profile(models, "faulty", tmp / "pids.json", *flags)
    cfg: dict[str, Any] = {
        "claim": {"gpus": 2, "cooldown_seconds": 1.0},
        "server": {"profile": "faulty", "models_dir": str(models), "backoff_initial_seconds": 0.5,
                   "stop_timeout_seconds": 30.0},
        "slurm": {"rescan_seconds": 1.0},
    }
    for key, value in (config or {}).items():
        cfg.setdefault(key, {}).update(value)
    return DaemonProc(tmp, cfg)


def server_pids(tmp: Path, timeout: float = 60.0, server: int | None = None) -> list[int]:
    """Every pid of the fault server's tree once it is up (of the server `server`, if given)."""
    path = tmp / "pids.json"

    def read() -> list[int] | None:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if server is not None and doc["server"] != server:
            return None
        return [int(doc["server"]), *map(int, doc["children"])]

    result: list[int] = wait_until(read, timeout, "the fault server's pids")
    return result


def pidfds(pids: list[int]) -> dict[int, int]:
    """pidfds for pids (opened before the fault, so a reused pid cannot fool the wait); gone ones skipped."""
    fds = {}
    for pid in pids:
        try:
            fds[pid] = os.pidfd_open(pid)
        except ProcessLookupError:
            pass
    return fds


def wait_all_gone(fds: dict[int, int], since: float, timeout: float) -> float:
    """Seconds from `since` until every process behind fds has exited; AssertionError at the deadline."""
    poller = select.poll()
    for fd in fds.values():
        poller.register(fd, select.POLLIN)
    left = set(fds.values())
    deadline = since + timeout
    # A zombie child of a stopped daemon counts as gone: its pidfd turns readable at exit.
    while left:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pids = [p for p, fd in fds.items() if fd in left]
            raise AssertionError(f"processes {pids} still alive {timeout} s after the fault")
        for fd, _ in poller.poll(remaining * 1000):
            left.discard(fd)
            poller.unregister(fd)
    took = time.monotonic() - since
    for fd in fds.values():
        os.close(fd)
    print(f"server tree gone {took * 1000:.1f} ms after the fault", file=sys.stderr)
    return took


def run_prolog(daemon: DaemonProc, gpus: str, job: str, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run `exporter-watchdog prolog` as Slurm would for a job on `gpus`; (result, seconds it took)."""
    env = {**os.environ, "SLURM_JOB_ID": job, "SLURM_JOB_GPUS": gpus}
    started = time.monotonic()
    result = subprocess.run([*EXE, "prolog", "--config", str(daemon.config_path), *args], capture_output=True,
                            text=True, timeout=120, env=env)
    return result, time.monotonic() - started
