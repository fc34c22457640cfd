"""Stopping a process tree: TERM, then KILL at a deadline, until nothing of it is left.

Shared by the supervisor's own stop, the clean-up of a server a dead daemon left behind, the guard
that outlives the daemon, and the Prolog when no daemon answers. Each process is checked before it
is signalled (start time and pidfd), so a reused pid is never hit.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from loguru import logger

from exporter_watchdog.act import procs
from exporter_watchdog.act.cgroup import ServerCgroup
from exporter_watchdog.act.procs import ProcInfo
from exporter_watchdog.act.record import ServerRecord

_FIRST_INTERVAL = 0.005  # the first re-check after a signal: a well-behaved server exits in ms
_MAX_INTERVAL = 0.1
_BACKOFF = 1.5


class Waker:
    """Sleeps between checks, waking early when the leader exits (through its pidfd)."""

    def __init__(self, pid: int | None) -> None:
        self._fd = -1
        if pid is not None:
            try:
                self._fd = os.pidfd_open(pid)
            except OSError:
                self._fd = -1  # gone already, or no pidfds: plain polling works too

    def wait(self, timeout: float) -> None:
        if self._fd >= 0:
            if procs.wait_pidfd(self._fd, timeout):
                self.close()  # stays readable once the leader is dead: poll by time from here on
            return
        time.sleep(max(0.0, timeout))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def terminate(
    members: Callable[[], list[ProcInfo]],
    *,
    group: int | None,
    term_timeout: float,
    kill_timeout: float,
    waker: Waker,
    proc_root: Path = procs.PROC,
    kill_all: Callable[[], None] | None = None,
) -> tuple[bool, int, int]:
    """Signal members() until none is left; return (escalated, remaining, processes seen).

    `group` is a process group that is ours (its leader is our unreaped child) and is signalled as a
    whole; `kill_all` (a cgroup kill) runs once at the escalation to SIGKILL and again while
    anything is left.
    """
    signalled: set[tuple[int, int]] = set()
    seen: set[tuple[int, int]] = set()

    def hit(sig: int, use_group: bool, again: bool) -> list[ProcInfo]:
        if use_group and group is not None:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass  # only the zombie leader is left in the group, or nobody
            except PermissionError as exc:
                logger.warning("killpg({}, {}): {}", group, sig, exc)
        if sig == signal.SIGKILL and kill_all is not None:
            try:
                kill_all()
            except OSError as exc:
                logger.warning("cgroup kill failed: {}", exc)
        live = members()
        for p in live:
            key = (p.pid, p.start_ticks)
            seen.add(key)
            # Group members just got sig from killpg. Each process gets SIGTERM only once: a second
            # one makes some servers abandon their graceful shutdown.
            if use_group and p.pgid == group:
                signalled.add(key)
            if again or key not in signalled:
                procs.signal_verified(p, sig, proc_root)
                signalled.add(key)
        return live

    def wait_until_gone(sig: int, deadline: float, again: bool) -> list[ProcInfo]:
        interval = _FIRST_INTERVAL
        live = hit(sig, use_group=True, again=again)
        while live:
            now = time.monotonic()
            if now >= deadline:
                break
            waker.wait(min(interval, deadline - now))
            interval = min(interval * _BACKOFF, _MAX_INTERVAL)
            # Processes forked since the last look get the signal too; SIGKILL is simply repeated,
            # group included.
            live = hit(sig, use_group=again, again=again)
        return live

    live = wait_until_gone(signal.SIGTERM, time.monotonic() + term_timeout, again=False)
    escalated = bool(live)
    if live:
        logger.warning("{} process(es) still alive after SIGTERM: sending SIGKILL", len(live))
        live = wait_until_gone(signal.SIGKILL, time.monotonic() + kill_timeout, again=True)
    return escalated, len(live), len(seen)


def record_cgroup(rec: ServerRecord) -> ServerCgroup | None:
    """The recorded server's own cgroup, where it has one."""
    return ServerCgroup(Path(rec.cgroup), rec.cgroup_kind or "v2") if rec.cgroup else None


def record_members(
    rec: ServerRecord, marker_env: str, proc_root: Path = procs.PROC, exclude: frozenset[int] = frozenset(),
) -> Callable[[], list[ProcInfo]]:
    """Everything of a recorded server that is alive: its cgroup, its session (if proven ours), its marker."""
    leader = procs.read_proc(rec.pid, proc_root) if rec.pid > 0 else None
    # Once the leader is proven to be ours, its session and group are ours too: the kernel does not
    # reuse that number while any member exists.
    trust_session = leader is not None and leader.alive and leader.start_ticks == rec.start_ticks
    cgroup = record_cgroup(rec)

    def members() -> list[ProcInfo]:
        out: dict[int, ProcInfo] = {}
        if cgroup is not None:
            for p in cgroup.members(proc_root):
                if p.pid not in exclude:
                    out[p.pid] = p
        for p in procs.list_processes(proc_root):
            if not p.alive or p.pid in exclude or p.pid in out:
                continue
            if trust_session and rec.pid > 0 and (p.sid == rec.sid or p.pgid == rec.pgid):
                out[p.pid] = p
                continue
            # Anything else only with our marker: children that left the session, or a server
            # spawned just before the daemon died (pid 0 in the record).
            env = procs.read_environ(p.pid, proc_root)
            if env is not None and env.get(marker_env) == rec.marker:
                out[p.pid] = p
        return list(out.values())

    return members


def reap_record(
    rec: ServerRecord,
    marker_env: str,
    *,
    term_timeout: float,
    kill_timeout: float,
    proc_root: Path = procs.PROC,
    exclude: frozenset[int] = frozenset(),
) -> tuple[int, int]:
    """Stop everything of a recorded server, verified process by process; (seen, remaining)."""
    members = record_members(rec, marker_env, proc_root, exclude)
    cgroup = record_cgroup(rec)
    found = members()
    if found:
        waker = Waker(None)
        _, remaining, seen = terminate(
            members, group=None, term_timeout=term_timeout, kill_timeout=kill_timeout, waker=waker,
            proc_root=proc_root, kill_all=cgroup.kill if cgroup is not None else None,
        )
        waker.close()
    else:
        remaining, seen = 0, 0
    if cgroup is not None and not remaining:
        cgroup.remove()
    return max(seen, len(found)), remaining
