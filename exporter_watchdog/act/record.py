"""The server record: what anyone but the daemon (its guard, the Prolog, the next daemon) needs to stop its server."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

MARKER_ENV = "EXPORTER_WATCHDOG_SERVER"  # in the server's environment: a random token per server
# The record's path in the server's environment: tells this daemon's servers from another daemon's.
RECORD_ENV = "EXPORTER_WATCHDOG_RECORD"
RECORD_NAME = "server.json"  # in the state dir: read by the next daemon, the guard and the Prolog


@dataclass(frozen=True)
class ServerRecord:
    """Identity of one server tree: its leader, session, marker, GPUs and cgroup."""

    pid: int  # 0 while the server is being spawned: only the marker (or the cgroup) can find it then
    pgid: int
    sid: int
    start_ticks: int  # /proc/PID/stat starttime of the leader: tells it apart from a reused pid
    marker: str  # value of the marker variable in the server's environment, inherited by its tree
    argv: list[str]
    started_at: float  # wall clock
    gpus: list[int] | None = None  # the GPUs the server holds; None = unknown (an older record): all
    cgroup: str | None = None  # the server's own cgroup folder, where it has one
    cgroup_kind: str | None = None  # "v2", "v1-freezer" or "v1-pids"

    def to_json(self) -> str:
        """Serialize to one JSON object (one line)."""
        return json.dumps(asdict(self), sort_keys=True)

    def with_pid(self, pid: int, start_ticks: int) -> ServerRecord:
        """The record once the leader exists (it leads its own session and group)."""
        return replace(self, pid=pid, pgid=pid, sid=pid, start_ticks=start_ticks)

    def holds_any(self, gpus: set[int] | frozenset[int]) -> bool:
        """True when the server may hold one of `gpus` (unknown GPUs count as all)."""
        return self.gpus is None or bool(set(self.gpus) & set(gpus))

    @classmethod
    def from_json(cls, text: str, source: Path | str) -> ServerRecord:
        """Parse a record; ValueError naming the source and the bad key on anything malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        for key in ("pid", "pgid", "sid", "start_ticks"):
            if not _is_int(data.get(key)):
                raise ValueError(f"{source}: key {key!r} must be an integer, got {data.get(key)!r}")
        if not isinstance(data.get("marker"), str) or not data["marker"]:
            raise ValueError(f"{source}: key 'marker' must be a non-empty string, got {data.get('marker')!r}")
        argv = data.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"{source}: key 'argv' must be a list of strings, got {argv!r}")
        started = data.get("started_at")
        if not isinstance(started, (int, float)) or isinstance(started, bool):
            raise ValueError(f"{source}: key 'started_at' must be a number, got {started!r}")
        gpus = data.get("gpus")
        if gpus is not None and (not isinstance(gpus, list) or not all(_is_int(g) for g in gpus)):
            raise ValueError(f"{source}: key 'gpus' must be a list of GPU indices or null, got {gpus!r}")
        for key in ("cgroup", "cgroup_kind"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{source}: key {key!r} must be a string or null, got {data[key]!r}")
        return cls(
            pid=data["pid"], pgid=data["pgid"], sid=data["sid"], start_ticks=data["start_ticks"],
            marker=data["marker"], argv=list(argv), started_at=float(started),
            gpus=None if gpus is None else list(gpus), cgroup=data.get("cgroup"), cgroup_kind=data.get("cgroup_kind"),
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_atomic(path: Path, text: str) -> None:
    """Replace path with text, never leaving a half-written file; OSError when the disk refuses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep our half-written temp file
        raise


def load_record(path: Path) -> ServerRecord | None:
    """The record at path, if any; ValueError naming the file when it is malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return ServerRecord.from_json(text, path)
