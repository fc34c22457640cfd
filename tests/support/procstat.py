"""What a process costs, read from /proc: resident memory, threads, open files; and its loop's heartbeat."""

from __future__ import annotations

import os
import re

import httpx


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as a dict of its `Key: value` lines."""
    with open(f"/proc/{pid}/status") as fh:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in fh)}


def rss_kib(pid: int) -> int:
    """Resident set size in KiB."""
    return int(proc_status(pid)["VmRSS"].split()[0])


def threads(pid: int) -> int:
    return int(proc_status(pid)["Threads"])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


_HEARTBEAT = re.compile(r"^exporter_watchdog_loop_heartbeat_age_seconds (\S+)$", re.M)


def heartbeat_age(metrics_url: str, timeout: float = 10.0) -> float:
    """The daemon loop's heartbeat age from its own /metrics (seconds since it last came round)."""
    text = httpx.get(metrics_url, timeout=timeout).text
    match = _HEARTBEAT.search(text)
    if match is None:
        raise AssertionError(f"no loop heartbeat in /metrics:\n{text[:2000]}")
    return float(match.group(1))
