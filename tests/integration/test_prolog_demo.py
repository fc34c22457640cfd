"""`exporter-watchdog prolog` against a running daemon (demo node): release, not ours, no daemon."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.daemon import EXE, DaemonProc, group_alive
from tests.support.faults import run_prolog


def test_prolog_returns_after_our_server_is_gone(daemon: DaemonProc) -> None:
    pid = daemon.start().status()["server_pid"]  # type: ignore[index]
    result, _ = run_prolog(daemon, "3", "41")
    assert result.returncode == 0
    assert "GPUs [3] released, the server is gone" in result.stderr
    assert not group_alive(pid), "the server must be gone when the prolog returns"
    doc = daemon.status()
    assert doc is not None and doc["last_yield"]["reason"] == "prolog" and doc["last_yield"]["jobs"] == ["41"]
    # The GPU stays the job's: the daemon comes back on the other free GPUs, never on 3.
    doc = daemon.wait_state("serving", 30)
    assert 3 not in doc["claimed_gpus"]


def test_prolog_for_gpus_we_do_not_hold_does_not_wait(daemon: DaemonProc) -> None:
    pid = daemon.start().status()["server_pid"]  # type: ignore[index]
    result, _ = run_prolog(daemon, "0", "42")
    assert result.returncode == 0 and "were not ours" in result.stderr
    assert daemon.status()["server_pid"] == pid  # type: ignore[index]


def test_prolog_without_gpus_or_daemon_exits_zero_at_once(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    env = {**os.environ, "SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "1"}
    result = subprocess.run([*EXE, "prolog", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0 and "no daemon is running" in result.stderr
    env.pop("SLURM_JOB_GPUS")
    result = subprocess.run([*EXE, "prolog", "--config", str(config)], capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0 and "no GPUs, nothing to do" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("claim: [\n")
    result = subprocess.run([*EXE, "prolog", "--config", str(bad)], capture_output=True, text=True,
                            timeout=60, env={**env, "SLURM_JOB_GPUS": "0"})
    assert result.returncode == 0 and "error ignored" in result.stderr
