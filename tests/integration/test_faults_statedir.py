"""Fault table, the state dir: full (ENOSPC on a small tmpfs) and unwritable. Yields go on, errors are
logged once, and the daemon recovers when the disk does.

The state dir is a 1 MiB tmpfs mounted for the test; the demo node's job folders get a tmpfs of their
own inside it, so the simulated Slurm can still start jobs while the state dir is full.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import FAST_DEMO, DaemonProc, group_alive, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=True)


def _fill(path: Path) -> Path:
    """Write a file until the file system is full."""
    filler = path / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


# One GPU claimed: jobs on 3, 2, 1 in turn each leave a free GPU to serve on again.
ONE_GPU = {**FAST_DEMO, "claim": {"gpus": 1, "cooldown_seconds": 1.0}}


def _yield_and_serve_again(daemon: DaemonProc, gpu: str, pid: int) -> int:
    """A demo job on `gpu`: the server `pid` is gone, then a new one serves off that GPU; its pid."""
    daemon.demo_job("--gpus", gpu)
    wait_until(lambda: not group_alive(pid), 30, f"the yield to the job on GPU {gpu}")
    doc = daemon.wait_status(lambda d: d["state"] == "serving" and d["server_ready"] and d["server_pid"] != pid,
                             60, "serving again")
    assert int(gpu) not in doc["claimed_gpus"]
    return int(doc["server_pid"])


@pytest.fixture
def small_state(tmp_path: Path) -> Iterator[Path]:
    state = tmp_path / "state"
    _mount_tmpfs(state, "1m")
    _mount_tmpfs(state / "demo-node", "16m")
    try:
        yield state
    finally:
        for mount in (state / "demo-node", state):
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_state_dir_does_not_stop_yields_and_is_logged_once(tmp_path: Path, small_state: Path) -> None:
    daemon = DaemonProc(tmp_path, {**ONE_GPU, "state_dir": str(small_state)})
    try:
        pid = daemon.start().status()["server_pid"]  # type: ignore[index]
        filler = _fill(small_state)
        # Two yields and two restarts with a full disk: each start fails to write the record.
        for gpu in ("3", "2"):
            pid = _yield_and_serve_again(daemon, gpu, pid)
        log = daemon.log()
        assert log.count("cannot write the server record") == 1, log[-4000:]
        assert "No space left on device" in log
        record = daemon.server_record()  # at most the small first record of the start got through
        assert record is None or record["pid"] == 0
        # The guard still protects a server without a record on disk.
        assert daemon.status()["guard_pid"]  # type: ignore[index]

        # Space returns: the next start writes its record again.
        filler.unlink()
        _yield_and_serve_again(daemon, "1", pid)
        wait_until(lambda: "server record" in daemon.log() and "written again" in daemon.log(), 60,
                   "the record written again")
        record = daemon.server_record()
        assert record is not None and 1 not in record["gpus"]
        assert daemon.log().count("cannot write the server record") == 1
    finally:
        daemon.stop()


def test_a_read_only_state_dir_does_not_stop_yields(tmp_path: Path) -> None:
    """A read-only bind mount (root ignores file modes) over the state dir; the demo node's own folder,
    bind-mounted on top, stays writable so that the simulated Slurm can start jobs."""
    state = tmp_path / "state"
    daemon = DaemonProc(tmp_path, {**ONE_GPU, "state_dir": str(state)})
    mounted: list[Path] = []
    try:
        pid = daemon.start().status()["server_pid"]  # type: ignore[index]
        for path in (state, state / "demo-node"):
            subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
            mounted.append(path)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(state)], check=True)
        for gpu in ("3", "2"):
            pid = _yield_and_serve_again(daemon, gpu, pid)
        log = daemon.log()
        assert log.count("cannot write the server record") == 1, log[-4000:]
        assert log.count("cannot open the server log") == 1
        assert "Read-only file system" in log
        # Writable again: the next start writes its record.
        subprocess.run(["mount", "-o", "remount,bind,rw", str(state)], check=True)
        _yield_and_serve_again(daemon, "1", pid)
        wait_until(lambda: "written again" in daemon.log(), 60, "the record written again")
        record = daemon.server_record()
        assert record is not None and record["pid"] and 1 not in record["gpus"]
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False)
        daemon.stop()
