"""Stop the server for a job when its daemon cannot: dead, stopped, or stuck.

Used by the Prolog. The server is found by its record in the state dir (leader pid, start time,
marker, GPUs, cgroup) or, where the record could not be written (a full disk), by the marker
variable in the environment of its processes; each process is checked (start time, marker) before
it is signalled, so a reused pid is never hit. A server that holds none of the job's GPUs is left
alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from exporter_watchdog.act import procs
from exporter_watchdog.act.reaper import reap_record
from exporter_watchdog.act.record import RECORD_ENV, ServerRecord, load_record

# SIGTERM first, SIGKILL after this: the job is waiting, and a hung daemon's server gets no better.
TERM_GRACE = 1.0


@dataclass(frozen=True)
class Outcome:
    """What the fail-safe did, in words for the Prolog's log."""

    stopped: int  # processes stopped
    remaining: int  # processes still alive at the deadline
    message: str


def _gpus_of(env: dict[str, str]) -> list[int] | None:
    """The GPUs a server process was started on; None when its environment does not say."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        return None


def marked_servers(record_path: Path, marker_env: str, proc_root: Path = procs.PROC) -> list[ServerRecord]:
    """This daemon's servers found by their marker alone (no record), GPUs from their environment."""
    found: dict[str, ServerRecord] = {}
    me = os.getpid()
    for p in procs.list_processes(proc_root):
        if not p.alive or p.pid == me:
            continue
        env = procs.read_environ(p.pid, proc_root)
        marker = env.get(marker_env) if env else None
        if not env or not marker or marker in found or env.get(RECORD_ENV) != str(record_path):
            continue  # not a server, or another daemon's
        found[marker] = ServerRecord(0, 0, 0, 0, marker, [], 0.0, gpus=_gpus_of(env))
    return list(found.values())


def stop_for_job(
    record_path: Path,
    marker_env: str,
    gpus: set[int],
    budget: float,
    proc_root: Path = procs.PROC,
) -> Outcome:
    """Stop whatever server holds any of `gpus`, within `budget` seconds; say what was done."""
    started = time.monotonic()
    try:
        record = load_record(record_path)
    except (ValueError, OSError):
        record = None
    records = [record] if record is not None else marked_servers(record_path, marker_env, proc_root)
    if not records:
        return Outcome(0, 0, "no server is running")
    targets = [r for r in records if r.holds_any(gpus)]
    if not targets:
        held = sorted({g for r in records for g in (r.gpus or [])})
        return Outcome(0, 0, f"the server holds GPUs {held}, none of the job's: left alone")
    stopped = remaining = 0
    for rec in targets:
        left = max(budget - (time.monotonic() - started), 0.0)
        term = min(TERM_GRACE, left / 2)
        seen, rest = reap_record(rec, marker_env, term_timeout=term, kill_timeout=max(left - term, 0.0),
                                 proc_root=proc_root, exclude=frozenset({os.getpid()}))
        stopped += seen
        remaining += rest
    took = (time.monotonic() - started) * 1000
    where = f"pid {targets[0].pid}" if targets[0].pid else "found by its marker"
    if not stopped:
        return Outcome(0, 0, f"the server ({where}) had already exited")
    if remaining:
        return Outcome(stopped, remaining, f"stopped the server ({where}) but {remaining} process(es) survived "
                                           f"SIGKILL ({took:.0f} ms)")
    return Outcome(stopped, 0, f"stopped the server ({where}, GPUs {targets[0].gpus}, {stopped} process(es)) "
                               f"itself; gone in {took:.0f} ms")
