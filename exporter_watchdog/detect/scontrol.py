"""Which GPUs a job holds on this node, from `scontrol show job -d -o ID` (Slurm 22.05 and later)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loguru import logger

from exporter_watchdog.detect.hostlist import expand_hostlist
from exporter_watchdog.detect.runner import CommandRunner

# Gres names whose allocation occupies GPU devices: whole GPUs, or slices of them (MPS, sharding).
GPU_GRES_NAMES = frozenset({"gpu", "mps", "shard"})

# What we pass to scontrol as a job id: a number, an array task (5_1), a het component (8+0) or a
# SLUID. Anything else (an option-like "-h", spaces) never reaches the command line.
_JOB_ID_ARG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+]{0,63}$")
_FIELD_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_:/]*$")
_INDEX_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
# name[:type]:count(detail); the type may itself hold colons (gpu:nvidia_a100:2) but no parentheses.
_GRES_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)(?::[^()]*)?(?:\((?P<detail>[^()]*)\))?$")
# Keys of the per-node detail group that `-d` prints after JOB_GRES.
_DETAIL_KEYS = frozenset({"CPU_IDs", "Mem", "GRES"})
# More indices than any node has GPUs means the text is not what we think it is.
_MAX_INDEX = 4096


class ScontrolParseError(ValueError):
    """scontrol printed something we cannot read; the caller must treat the job's GPUs as unknown."""


@dataclass(frozen=True)
class JobGpus:
    """The GPUs a job holds on our node (empty: CPU-only, none here, pending or finished)."""

    job_id: str
    state: str | None
    gpus: frozenset[int]
    user: str | None = None
    partition: str | None = None


@dataclass(frozen=True)
class JobQuery:
    """The answer to one scontrol call; gpus None means unknown, which the core treats as conflicting."""

    job_id: str
    gpus: frozenset[int] | None
    state: str | None
    duration: float  # seconds the call took
    error: str | None
    user: str | None = None
    partition: str | None = None


def _user_name(user_id: str | None) -> str | None:
    """`UserId=alice(1000)` -> `alice`; a bare uid when Slurm cannot resolve the name."""
    if not user_id or user_id == "(null)":
        return None
    name = user_id.split("(", 1)[0]
    return name or user_id.strip("()") or None


def parse_index_list(text: str) -> frozenset[int]:
    """Parse a GPU index list such as `0,2-3`; raise ValueError on anything else."""
    if not text.strip():
        raise ValueError("empty index list")
    indices: set[int] = set()
    for part in text.split(","):
        match = _INDEX_RANGE.match(part.strip())
        if match is None:
            raise ValueError(f"bad index {part!r} in index list {text!r}")
        low = int(match.group(1))
        high = int(match.group(2)) if match.group(2) is not None else low
        if high < low or high > _MAX_INDEX:
            raise ValueError(f"bad index range {part!r} in index list {text!r}")
        indices.update(range(low, high + 1))
    return frozenset(indices)


@dataclass(frozen=True)
class _Record:
    """One job record of scontrol's output, as ordered key/value fields."""

    fields: tuple[tuple[str, str], ...]

    @property
    def job_id(self) -> str:
        return self.fields[0][1]

    def first(self, key: str) -> str | None:
        """The value of the first field named key."""
        for k, v in self.fields:
            if k == key:
                return v
        return None


def _split_records(text: str) -> list[str]:
    """Split into job records: each starts with `JobId=` at the start of a line (both -o and multi-line)."""
    records: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("JobId="):
            records.append([line])
        elif not line.strip():
            continue
        elif records:
            records[-1].append(line)
        else:
            raise ScontrolParseError(f"expected a JobId= record, got {line.strip()[:80]!r}")
    return [" ".join(lines) for lines in records]


def _parse_fields(record: str) -> _Record:
    """Tokenize `Key=Value` fields; a token without `=` continues the previous value (a name with spaces)."""
    fields: list[tuple[str, str]] = []
    for token in record.split():
        key, sep, value = token.partition("=")
        if sep and _FIELD_KEY.match(key):
            fields.append((key, value))
        elif fields:
            last_key, last_value = fields[-1]
            fields[-1] = (last_key, f"{last_value} {token}")
        else:
            raise ScontrolParseError(f"record does not start with a field: {record[:80]!r}")
    if not fields or fields[0][0] != "JobId" or not fields[0][1]:
        raise ScontrolParseError(f"record without a JobId: {record[:80]!r}")
    return _Record(tuple(fields))


def _detail_groups(record: _Record) -> list[tuple[str, str | None]]:
    """The (hostlist, gres) pairs of the `Nodes=... CPU_IDs=... Mem=... GRES=...` groups."""
    groups: list[tuple[str, str | None]] = []
    in_group = False
    for key, value in record.fields:
        if key == "Nodes":
            groups.append((value, None))
            in_group = True
        elif in_group and key in _DETAIL_KEYS:
            if key == "GRES":
                groups[-1] = (groups[-1][0], value)
        else:
            in_group = False
    return groups


def _split_gres(value: str) -> list[str]:
    """Split a GRES value at commas outside parentheses: `gpu:a30:1(IDX:0,2),bw(CNT:10)`."""
    entries: list[str] = []
    depth = 0
    start = 0
    for i, ch in enumerate(value):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise ScontrolParseError(f"unbalanced ')' in GRES {value!r}")
        elif ch == "," and depth == 0:
            entries.append(value[start:i])
            start = i + 1
    if depth != 0:
        raise ScontrolParseError(f"unbalanced '(' in GRES {value!r}")
    entries.append(value[start:])
    return [entry for entry in entries if entry]


def _gpus_in_gres(value: str) -> frozenset[int]:
    """GPU indices of one node's GRES value; a GPU entry without IDX is unreadable, so it raises."""
    gpus: set[int] = set()
    for entry in _split_gres(value.strip()):
        match = _GRES_ENTRY.match(entry)
        if match is None:
            raise ScontrolParseError(f"unreadable GRES entry {entry!r}")
        if match.group("name") not in GPU_GRES_NAMES:
            continue
        detail = match.group("detail") or ""
        if not detail.startswith("IDX:"):
            raise ScontrolParseError(f"GPU GRES entry {entry!r} names no indices")
        try:
            gpus |= parse_index_list(detail[len("IDX:") :])
        except ValueError as exc:
            raise ScontrolParseError(f"GRES entry {entry!r}: {exc}") from None
    return frozenset(gpus)


def _hosts(expr: str) -> list[str]:
    try:
        return expand_hostlist(expr)
    except ValueError as exc:
        raise ScontrolParseError(str(exc)) from None


def _gpus_on_node(record: _Record, node: str) -> frozenset[int]:
    """Union of the GPU indices of every detail group that names our node."""
    gpus: set[int] = set()
    covered = False
    for hostlist, gres in _detail_groups(record):
        if node not in _hosts(hostlist):
            continue
        covered = True
        if gres:
            gpus |= _gpus_in_gres(gres)
    node_list = record.first("NodeList")
    if not covered and node_list and node_list != "(null)" and node in _hosts(node_list):
        # The job runs here but no detail group says what it holds: not the `-d` format we know.
        raise ScontrolParseError(f"job {record.job_id} runs on {node} but shows no per-node GRES detail")
    return frozenset(gpus)


def parse_show_job(text: str, node: str, job_id: str | None = None) -> JobGpus:
    """Parse `scontrol show job -d [-o]` for our node; job_id picks one record (arrays, het jobs)."""
    records = [_parse_fields(raw) for raw in _split_records(text)]
    if not records:
        raise ScontrolParseError("no JobId= record in scontrol output")
    if job_id is None:
        chosen = records[:1]
    else:
        # Asking for an array's or het job's first id prints every task or component; the cgroup
        # named job_N belongs to the record whose own JobId is N (or whose SLUID is the name).
        chosen = [r for r in records if job_id in (r.job_id, r.first("SLUID"))]
        if not chosen and len(records) == 1:
            chosen = records
        if not chosen:
            raise ScontrolParseError(f"no record for job {job_id} among {len(records)}")
    gpus: set[int] = set()
    for record in chosen:
        # Output without a job's state and nodes is not a job record: a GPU set read from it could
        # say "no GPUs" for a job that holds ours.
        missing = [key for key in ("JobState", "NodeList") if record.first(key) is None]
        if missing:
            raise ScontrolParseError(f"job {record.job_id}: no {' or '.join(key + '=' for key in missing)}")
        gpus |= _gpus_on_node(record, node)
    partition = chosen[0].first("Partition")
    return JobGpus(job_id=job_id or chosen[0].job_id, state=chosen[0].first("JobState"), gpus=frozenset(gpus),
                   user=_user_name(chosen[0].first("UserId")),
                   partition=partition if partition and partition != "(null)" else None)


class SlurmClient:
    """Asks scontrol which GPUs a job holds on this node, with a deadline; never raises."""

    def __init__(
        self,
        scontrol: Sequence[str],
        node: str,
        runner: CommandRunner,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scontrol = tuple(scontrol)
        self._node = node
        self._runner = runner
        self._timeout = timeout
        self._clock = clock

    def query_job(self, job_id: str) -> JobQuery:
        """Run `scontrol show job -d -o ID`; any failure gives gpus None with the reason in error."""
        start = self._clock()
        gpus: frozenset[int] | None = None
        state: str | None = None
        error: str | None = None
        user: str | None = None
        partition: str | None = None
        if not _JOB_ID_ARG.match(job_id):
            error = f"invalid job id {job_id!r}"
        else:
            try:
                result = self._runner([*self._scontrol, "show", "job", "-d", "-o", job_id], self._timeout)
            except TimeoutError:
                error = f"scontrol timed out after {self._timeout:g} s"
            except Exception as exc:  # an OSError, or a broken fake: both mean "unknown", never a crash
                error = f"scontrol failed: {exc}"
            else:
                if result.returncode != 0:
                    detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
                    reason = detail[-1] if detail else "no output"
                    if "invalid job id" in reason.lower():
                        error = f"Slurm does not know job {job_id} ({reason})"
                    else:
                        error = f"scontrol exited {result.returncode}: {reason}"
                else:
                    try:
                        parsed = parse_show_job(result.stdout, self._node, job_id)
                    except ScontrolParseError as exc:
                        error = f"unreadable scontrol output: {exc}"
                    else:
                        gpus, state = parsed.gpus, parsed.state
                        user, partition = parsed.user, parsed.partition
        duration = self._clock() - start
        if error is not None:
            logger.warning("job {}: GPUs unknown: {} ({:.3f} s)", job_id, error, duration)
        else:
            logger.debug("job {}: state {} GPUs {} ({:.3f} s)", job_id, state, sorted(gpus or ()), duration)
        return JobQuery(job_id=job_id, gpus=gpus, state=state, duration=duration, error=error, user=user,
                        partition=partition)
