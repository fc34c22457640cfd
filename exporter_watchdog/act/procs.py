"""The narrow /proc interface the supervisor and the GPU ownership code read processes through."""

from __future__ import annotations

import errno
import os
import select
import signal
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
# States of a process that has exited and holds nothing but its table entry.
_DEAD_STATES = frozenset({"Z", "X", "x"})


@dataclass(frozen=True)
class ProcInfo:
    """One process as /proc/PID/stat describes it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str  # R, S, D, Z, T, ... (see proc(5))
    start_ticks: int  # start time after boot in clock ticks: with the pid, identifies one process

    @property
    def alive(self) -> bool:
        """True unless the process is a zombie (exited, not yet reaped)."""
        return self.state not in _DEAD_STATES


def parse_stat(text: str) -> ProcInfo:
    """Parse the one line of /proc/PID/stat; raise ValueError when it is not one."""
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the *last* ')'.
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren < 0 or close_paren < open_paren:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    pid = int(text[:open_paren])
    rest = text[close_paren + 1 :].split()
    if len(rest) < 20:
        raise ValueError(f"short /proc/PID/stat line: {text[:80]!r}")
    # rest[i] is field i + 3 of proc(5): 3 state, 4 ppid, 5 pgrp, 6 session, 22 starttime.
    return ProcInfo(
        pid=pid,
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        sid=int(rest[3]),
        state=rest[0],
        start_ticks=int(rest[19]),
    )


def _read_stat(path: str) -> ProcInfo | None:
    # os.open/os.read on a str path: a full /proc scan runs on every check while stopping, and
    # pathlib plus text wrappers cost several times more than the read itself.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT):
            return None
        raise
    try:
        raw = os.read(fd, 4096)
    except ProcessLookupError:
        return None
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise
    finally:
        os.close(fd)
    try:
        return parse_stat(raw.decode(errors="replace"))
    except ValueError:
        # A process caught half-way through exit can leave an empty stat behind.
        return None


def read_proc(pid: int, proc_root: Path = PROC) -> ProcInfo | None:
    """Read one process; None when it does not exist (or vanished while being read)."""
    return _read_stat(f"{proc_root}/{pid}/stat")


def list_processes(proc_root: Path = PROC) -> list[ProcInfo]:
    """Every process (thread-group leaders only) under proc_root; pids that vanish are skipped."""
    out: list[ProcInfo] = []
    try:
        names = os.listdir(proc_root)
    except FileNotFoundError:
        return out
    base = str(proc_root)
    for name in names:
        if not name.isdigit():
            continue
        info = _read_stat(f"{base}/{name}/stat")
        if info is not None:
            out.append(info)
    return out


def _read_pid_file(pid: int, name: str, proc_root: Path) -> bytes | None:
    """/proc/PID/NAME; None when the process is gone or not ours to read."""
    try:
        return (proc_root / str(pid) / name).read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.ENOENT, errno.EACCES, errno.EPERM):
            return None
        raise


def read_environ(pid: int, proc_root: Path = PROC) -> dict[str, str] | None:
    """The environment a process started with; None when it is gone or not ours to read."""
    raw = _read_pid_file(pid, "environ", proc_root)
    if raw is None:
        return None
    env: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="surrogateescape")] = value.decode(errors="surrogateescape")
    return env


def read_cgroup(pid: int, proc_root: Path = PROC) -> list[str] | None:
    """The lines of /proc/PID/cgroup; None when the process is gone."""
    raw = _read_pid_file(pid, "cgroup", proc_root)
    if raw is None:
        return None
    return [line for line in raw.decode(errors="replace").splitlines() if line]


def live_members(sid_or_pgid: int, procs: list[ProcInfo]) -> list[ProcInfo]:
    """Non-zombie processes whose process group or session is sid_or_pgid."""
    return [p for p in procs if p.alive and (p.pgid == sid_or_pgid or p.sid == sid_or_pgid)]


def signal_verified(info: ProcInfo, sig: int, proc_root: Path = PROC) -> bool:
    """Send sig to exactly the process `info` describes; False when it is gone or was replaced."""
    # A pidfd pins one process: if /proc still shows the same start time after opening it, the
    # signal cannot reach a newcomer that inherited the pid in between.
    try:
        fd = os.pidfd_open(info.pid)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
            raise
        fd = -1  # kernel without pidfds: fall back to a checked kill(2)
    try:
        now = read_proc(info.pid, proc_root)
        if now is None or now.start_ticks != info.start_ticks:
            return False
        if fd >= 0:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(info.pid, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        if fd >= 0:
            os.close(fd)


def wait_pidfd(fd: int, timeout: float) -> bool:
    """Wait up to timeout for the process behind pidfd fd to exit; True when it has."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0.0, timeout) * 1000.0))
