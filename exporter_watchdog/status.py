"""The status document (`status --json`, GET /status) and its human rendering."""

from __future__ import annotations

import datetime as dt
from typing import Any

from exporter_watchdog import __version__
from exporter_watchdog.core.model import Snapshot


def status_dict(snap: Snapshot, wall_now: float) -> dict[str, Any]:
    """Everything `status` shows, as plain JSON values."""
    uptime = None
    if snap.server_pid and snap.server_started_at is not None:
        uptime = round(max(wall_now - snap.server_started_at, 0.0), 1)
    last_yield = None
    if snap.last_yield_at is not None:
        last_yield = {
            "at": _iso(snap.last_yield_at),
            "seconds_ago": round(max(wall_now - snap.last_yield_at, 0.0), 1),
            "reason": snap.last_yield_reason,
            "jobs": list(snap.last_yield_jobs),
        }
    return {
        "version": __version__,
        "node": snap.node,
        "state": snap.phase.value,
        "claimed_gpus": list(snap.claimed_gpus),
        "node_gpus": snap.node_gpus,
        "gpu_owner": {str(g): o.value for g, o in sorted(snap.gpu_owner.items())},
        "profile": snap.profile,
        "model": snap.model,
        "server_pid": snap.server_pid,
        "server_ready": snap.server_ready,
        "server_uptime_seconds": uptime,
        "server_argv": snap.extra.get("server_argv"),
        "stop_method": snap.extra.get("stop_method"),
        "guard_pid": int(snap.extra["guard_pid"]) if "guard_pid" in snap.extra else None,
        "last_yield": last_yield,
        "crashes": snap.crashes,
        "disabled_reason": snap.disabled_reason,
        "jobs": [
            {"job_id": j.job_id, "gpus": None if j.gpus is None else sorted(j.gpus), "source": j.source.value}
            for j in snap.jobs
        ],
        "harvested_gpu_seconds": round(snap.harvested_gpu_seconds, 1),
        "idle_gpu_seconds": round(snap.idle_gpu_seconds, 1),
        "tunnel": {
            "enabled": snap.tunnel_enabled,
            "state": snap.tunnel_state,
            "pid": snap.tunnel_pid,
            "ready": snap.tunnel_ready,
            "url": snap.tunnel_url,
            "restarts": snap.tunnel_restarts,
        },
    }


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, tz=dt.timezone.utc).isoformat(timespec="seconds")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def render_status(doc: dict[str, Any]) -> str:
    """`status` for people."""
    gpus = ",".join(map(str, doc["claimed_gpus"])) or "-"
    lines = [
        f"node:        {doc['node']} ({doc['node_gpus']} GPUs: "
        + " ".join(f"{g}={o}" for g, o in doc["gpu_owner"].items()) + ")",
        f"state:       {doc['state']}" + (f" ({doc['disabled_reason']})" if doc.get("disabled_reason") else ""),
        f"claimed:     {gpus}",
        f"profile:     {doc['profile'] or '-'}" + (f" ({doc['model']})" if doc.get("model") else ""),
        "server:      " + (
            f"pid {doc['server_pid']}, up {_duration(doc['server_uptime_seconds'])}, "
            + ("ready" if doc["server_ready"] else "not ready yet")
            if doc["server_pid"] else "not running"
        ),
    ]
    if doc.get("stop_method"):
        guard = f"; guard pid {doc['guard_pid']}" if doc.get("guard_pid") else ""
        lines.append(f"stops by:    {doc['stop_method']}{guard}")
    last = doc.get("last_yield")
    if last:
        lines.append(
            f"last yield:  {_duration(last['seconds_ago'])} ago to job(s) {', '.join(last['jobs']) or '-'}"
            f" ({last['reason']})"
        )
    else:
        lines.append("last yield:  never")
    jobs = doc.get("jobs") or []
    if jobs:
        shown = ", ".join(
            f"{j['job_id']}[{'?' if j['gpus'] is None else ','.join(map(str, j['gpus'])) or 'cpu'}]" for j in jobs
        )
        lines.append(f"jobs:        {shown}")
    if doc.get("crashes"):
        lines.append(f"crashes:     {doc['crashes']} in a row")
    tunnel = doc.get("tunnel") or {}
    if tunnel.get("enabled"):
        where = tunnel.get("url") or "(no tunnel.hostname)"
        pid = f", pid {tunnel['pid']}" if tunnel.get("pid") else ""
        again = f", {tunnel['restarts']} restart(s)" if tunnel.get("restarts") else ""
        lines.append(f"tunnel:      {tunnel['state']}{pid}{again}: {where}")
    return "\n".join(lines)
