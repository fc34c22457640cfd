"""A cluster's job history as plain values: parsers for `sacct -P` output, a simple CSV and `sinfo`."""

from __future__ import annotations

import csv
import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from exporter_watchdog.detect.hostlist import expand_hostlist

# Printed by sacct for times it does not know: a job that has not started or not ended yet.
NO_TIME = frozenset({"", "unknown", "none", "n/a"})
SACCT_COLUMNS = ("jobid", "nodelist", "alloctres", "start", "end")
CSV_COLUMNS = ("job_id", "nodes", "gpus", "start", "end")
_GPU_TRES = re.compile(r"gres/gpu(?::([^=,]+))?=(\d+)")
_EPOCH = datetime(1970, 1, 1)


class TraceError(Exception):
    """Input that cannot be read; `str()` names the file, the line and the offending value."""

    def __init__(self, source: str, where: str, value: object, problem: str) -> None:
        super().__init__(f"{source}: {where}: {value!r}: {problem}")


@dataclass(frozen=True)
class TraceJob:
    """One job as the trace tells it: where it ran, how many GPUs per node, when."""

    job_id: str
    nodes: tuple[str, ...]
    gpus: tuple[int, ...]  # GPUs on each node of `nodes`, same order (0: CPU-only there)
    start: float  # seconds (epoch, or any fixed origin)
    end: float | None  # None: still running when the trace was taken (sacct prints Unknown)


@dataclass
class Trace:
    """The jobs of a trace and what was left out, with why."""

    source: str
    jobs: list[TraceJob] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1


def parse_time(text: str) -> float | None:
    """sacct's `2026-11-30T05:20:08` (read as UTC: run sacct with TZ=UTC), epoch seconds, or None."""
    value = text.strip()
    if value.lower() in NO_TIME:
        return None
    if "T" not in value and ":" not in value:
        return float(value)
    stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is not None:
        return stamp.timestamp()
    return (stamp - _EPOCH).total_seconds()


def gpus_in_tres(tres: str) -> int:
    """The job's GPU count in AllocTRES: `gres/gpu=N`, else the sum of typed `gres/gpu:TYPE=N`."""
    untyped = 0
    typed = 0
    found_untyped = False
    for match in _GPU_TRES.finditer(tres):
        if match.group(1) is None:
            untyped, found_untyped = int(match.group(2)), True
        else:
            typed += int(match.group(2))
    return untyped if found_untyped else typed


@functools.lru_cache(maxsize=4096)
def split_gpus(total: int, nodes: int) -> tuple[int, ...]:
    """A job's GPUs per node: sacct gives the job's total; Slurm spreads --gres evenly (remainder first)."""
    if nodes <= 0:
        return ()
    base, extra = divmod(total, nodes)
    return tuple(base + (1 if i < extra else 0) for i in range(nodes))


def _lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from fh
    except OSError as exc:
        raise TraceError(str(path), "(file)", str(path), f"cannot read: {exc.strerror}") from None


def detect_format(path: Path) -> str:
    """`sacct` when the first line has `|`, `csv` when it names the CSV columns."""
    for line in _lines(path):
        if not line.strip():
            continue
        if "|" in line:
            return "sacct"
        if "job_id" in line.lower() and "," in line:
            return "csv"
        raise TraceError(str(path), "line 1", line.strip()[:80],
                         "neither `sacct -P` output (| separated) nor a CSV with a header "
                         f"{','.join(CSV_COLUMNS)}")
    raise TraceError(str(path), "(file)", str(path), "empty trace")


def read_trace(path: Path, fmt: str = "auto") -> Trace:
    """Read a trace file in `sacct`, `csv` or `auto`-detected format."""
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "sacct":
        return parse_sacct(_lines(path), str(path))
    if fmt == "csv":
        return parse_csv(_lines(path), str(path))
    raise TraceError(str(path), "--format", fmt, "expected sacct, csv or auto")


def parse_sacct(lines: Iterable[str], source: str = "(sacct)") -> Trace:
    """`sacct -a -X -P --format=JobID,NodeList,AllocTRES,Start,End[,State]` output (-p and -n too)."""
    trace = Trace(source)
    columns: dict[str, int] | None = None
    # A trace repeats few node lists and TRES strings: read each once.
    hosts: dict[str, tuple[str, ...]] = {}
    tres_gpus: dict[str, int] = {}
    for number, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        fields = line.split("|")
        if line.endswith("|"):  # -p prints a trailing separator; -P does not
            fields.pop()
        if columns is None:
            names = [f.strip().lower() for f in fields]
            if "jobid" in names:
                missing = [c for c in SACCT_COLUMNS if c not in names]
                if missing:
                    raise TraceError(source, f"line {number}", line, f"header lacks {', '.join(missing)}; "
                                     "use --format=JobID,NodeList,AllocTRES,Start,End,State")
                columns = {name: names.index(name) for name in (*SACCT_COLUMNS, "state") if name in names}
                continue
            columns = {name: i for i, name in enumerate((*SACCT_COLUMNS, "state"))}  # -n: the documented order
        if len(fields) < len(SACCT_COLUMNS):
            raise TraceError(source, f"line {number}", line, f"expected {len(SACCT_COLUMNS)}+ | separated fields")
        job_id = fields[columns["jobid"]].strip()
        if "." in job_id:
            trace.skip("job steps (run sacct with -X)")
            continue
        try:
            start = parse_time(fields[columns["start"]])
            end = parse_time(fields[columns["end"]])
        except ValueError as exc:
            raise TraceError(source, f"line {number}", line, f"bad Start/End time: {exc}") from None
        nodelist = fields[columns["nodelist"]].strip()
        if start is None or nodelist in ("", "None assigned", "(null)"):
            trace.skip("never started (pending, or cancelled before start)")
            continue
        if end is not None and end < start:
            trace.skip("ends before it starts")
            continue
        nodes = hosts.get(nodelist)
        if nodes is None:
            try:
                nodes = hosts[nodelist] = tuple(expand_hostlist(nodelist))
            except ValueError as exc:
                raise TraceError(source, f"line {number}", nodelist, f"bad NodeList: {exc}") from None
        tres = fields[columns["alloctres"]]
        total = tres_gpus.get(tres)
        if total is None:
            total = tres_gpus[tres] = gpus_in_tres(tres)
        gpus = split_gpus(total, len(nodes))
        trace.jobs.append(TraceJob(job_id, nodes, gpus, start, end))
    return trace


def parse_csv(lines: Iterable[str], source: str = "(csv)") -> Trace:
    """A CSV with the header `job_id,nodes,gpus,start,end`: hostlist, GPUs per node, ISO or epoch times."""
    trace = Trace(source)
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        raise TraceError(source, "(file)", source, "empty trace")
    names = [h.strip().lower() for h in header]
    missing = [c for c in CSV_COLUMNS if c not in names]
    if missing:
        raise TraceError(source, "line 1", ",".join(header), f"header lacks {', '.join(missing)}")
    at = {name: names.index(name) for name in CSV_COLUMNS}
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) < len(names):
            raise TraceError(source, f"line {number}", ",".join(row), f"expected {len(names)} fields")
        job_id = row[at["job_id"]].strip()
        try:
            start = parse_time(row[at["start"]])
            end = parse_time(row[at["end"]])
        except ValueError as exc:
            raise TraceError(source, f"line {number}", ",".join(row), f"bad start/end time: {exc}") from None
        gpus_text = row[at["gpus"]].strip()
        if not gpus_text.isdigit():
            raise TraceError(source, f"line {number}", gpus_text, "gpus: expected GPUs per node, a whole number")
        if start is None:
            trace.skip("never started (pending, or cancelled before start)")
            continue
        if end is not None and end < start:
            trace.skip("ends before it starts")
            continue
        try:
            nodes = tuple(expand_hostlist(row[at["nodes"]]))
        except ValueError as exc:
            raise TraceError(source, f"line {number}", row[at["nodes"]], f"bad nodes: {exc}") from None
        trace.jobs.append(TraceJob(job_id, nodes, (int(gpus_text),) * len(nodes), start, end))
    return trace


def gres_gpus(gres: str) -> int:
    """GPUs in a `sinfo %G` value such as `gpu:a100:8(S:0-1),gpu:v100:2` or `(null)`."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = item.strip().split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


def read_sinfo(path: Path) -> dict[str, int]:
    """Nodes and their GPU counts from `sinfo -N -h -o '%N %G'` (a hostlist per line works too)."""
    nodes: dict[str, int] = {}
    for number, raw in enumerate(_lines(path), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.replace("|", " ").split()
        if len(parts) != 2 or parts[0].upper() in ("NODELIST", "HOSTNAMES"):
            if parts and parts[0].upper() in ("NODELIST", "HOSTNAMES"):
                continue
            raise TraceError(str(path), f"line {number}", line, "expected `NODES GRES` as `sinfo -N -h -o '%N %G'`")
        try:
            hosts = expand_hostlist(parts[0])
        except ValueError as exc:
            raise TraceError(str(path), f"line {number}", parts[0], f"bad node list: {exc}") from None
        count = gres_gpus(parts[1])
        for host in hosts:
            nodes[host] = max(nodes.get(host, 0), count)
    if not nodes:
        raise TraceError(str(path), "(file)", str(path), "no nodes in the sinfo dump")
    return nodes


def utc_text(seconds: float) -> str:
    """A trace time back as sacct prints it (UTC)."""
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
