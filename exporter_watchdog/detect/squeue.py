"""Jobs on this node from Slurm itself (`squeue -w NODE`), for nodes that have no job cgroups.

With `ProctrackType=proctrack/linuxproc` and `TaskPlugin=task/none` (unprivileged containers such
as RunPod pods) Slurm makes no job cgroups, so the cgroup watcher sees nothing. This source polls
`squeue` every `slurm.squeue_interval_seconds` and wakes the daemon when the set of jobs changes; the
daemon then asks `scontrol show job -d` for each new job's GPUs, exactly as for a job cgroup.

Fail-safe: while squeue cannot answer (timeout, error, unreadable output) the listing holds the
placeholder job UNREACHABLE, whose GPUs are unknown, so the core treats every GPU as held and the
server stops, as it does for a job cgroup that scontrol cannot describe.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from loguru import logger

from exporter_watchdog.detect.runner import CommandRunner
from exporter_watchdog.detect.scontrol import JobQuery

# The placeholder job while squeue fails. Not a valid Slurm job id (it has '-'), so it can never
# collide with a real one, and it is never passed to scontrol.
UNREACHABLE = "slurm-unreachable"
# States in which a job may have processes on the node: running (also while its Prolog runs),
# configuring (nodes booting), completing (the Epilog and processes still ending).
STATES = "RUNNING,CONFIGURING,COMPLETING"
# %A: the job's own id, unique per array task and het component (what scontrol show job takes).
_JOB_ID = re.compile(r"^\d+$")


class SqueueParseError(ValueError):
    """squeue printed something that is not one job id per line."""


def squeue_argv(squeue: Sequence[str], node: str) -> list[str]:
    """The command that prints the id of every job on `node`, one per line."""
    return [*squeue, "--noheader", f"--nodelist={node}", f"--states={STATES}", "--format=%A"]


def parse_job_ids(text: str) -> frozenset[str]:
    """Job ids from squeue's output; anything that is not a job id raises SqueueParseError."""
    ids: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if not _JOB_ID.match(line):
            raise SqueueParseError(f"line {number}: {line[:80]!r} is not a job id")
        ids.add(line)
    return frozenset(ids)


@dataclass(frozen=True)
class Listing:
    """One squeue answer: the jobs on the node, or the reason there is no answer."""

    jobs: frozenset[str]
    error: str | None
    duration: float


class JobQuerier(Protocol):
    """Anything with query_job(job_id) -> JobQuery (the SlurmClient)."""

    def query_job(self, job_id: str) -> JobQuery: ...


class SqueueJobs:
    """Polls squeue: the daemon's job lister, its watcher (wake, first_seen) and its Slurm client in one.

    `query_job` answers for the placeholder itself and hands real job ids to `slurm` (scontrol).
    """

    def __init__(
        self,
        squeue: Sequence[str],
        node: str,
        runner: CommandRunner,
        slurm: JobQuerier,
        wake: Callable[[], None],
        *,
        interval: float = 2.0,
        timeout: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"squeue interval must be positive, not {interval!r}")
        self._argv = squeue_argv(squeue, node)
        self._runner = runner
        self._slurm = slurm
        self._wake = wake
        self._interval = interval
        self._timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()  # guards the fields below between the poller and the daemon
        self._jobs: frozenset[str] = frozenset()
        self._error: str | None = None
        self._first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def mode(self) -> str:
        return "squeue"

    # --- the lister ------------------------------------------------------------------------------

    def list_once(self) -> Listing:
        """Run squeue once; never raises."""
        start = self._clock()
        error: str | None = None
        jobs: frozenset[str] = frozenset()
        try:
            result = self._runner(self._argv, self._timeout)
        except TimeoutError:
            error = f"squeue timed out after {self._timeout:g} s"
        except Exception as exc:  # an OSError (no squeue), or a broken fake: both mean "no answer"
            error = f"squeue failed: {exc}"
        else:
            if result.returncode != 0:
                detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
                error = f"squeue exited {result.returncode}: {detail[-1] if detail else 'no output'}"
            else:
                try:
                    jobs = parse_job_ids(result.stdout)
                except SqueueParseError as exc:
                    error = f"unreadable squeue output: {exc}"
        return Listing(jobs=jobs, error=error, duration=self._clock() - start)

    def refresh(self) -> bool:
        """List once and record the answer; whether the set of jobs (or reachability) changed."""
        listing = self.list_once()
        now = self._clock()
        with self._lock:
            before = (self._jobs, self._error is None)
            if listing.error is None:
                self._jobs = listing.jobs
                for job_id in listing.jobs:
                    self._first_seen.setdefault(job_id, now)
            else:
                self._first_seen.setdefault(UNREACHABLE, now)
            was_error, self._error = self._error, listing.error
            changed = before != (self._jobs, self._error is None)
        if listing.error is not None and was_error is None:
            logger.warning("cannot list the node's jobs ({}); every GPU counts as held until squeue answers",
                           listing.error)
        elif listing.error is None and was_error is not None:
            logger.info("squeue answers again ({:.3f} s)", listing.duration)
        return changed

    def jobs(self) -> dict[str, None]:
        """The jobs on the node as last listed, plus UNREACHABLE while squeue fails (the daemon's scan)."""
        with self._lock:
            ids = set(self._jobs)
            if self._error is not None:
                ids.add(UNREACHABLE)
        return dict.fromkeys(sorted(ids))

    # --- the watcher -----------------------------------------------------------------------------

    def start(self) -> None:
        """List once (so the first decision sees the jobs already there), then poll in a thread."""
        if self._thread is not None:
            raise RuntimeError("SqueueJobs already started")
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="squeue-poll", daemon=True)
        self._thread.start()
        logger.info("listing the node's jobs with `{}` every {:g} s", " ".join(self._argv), self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def first_seen(self, job_id: str) -> float | None:
        with self._lock:
            return self._first_seen.get(job_id)

    def forget(self, job_ids: Iterable[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._first_seen.pop(job_id, None)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self.refresh():
                    self._wake()
            except Exception:  # keep polling: a dead poller would never wake the daemon again
                logger.exception("error listing jobs with squeue")

    # --- the Slurm client ------------------------------------------------------------------------

    def query_job(self, job_id: str) -> JobQuery:
        """scontrol's answer for a real job; for the placeholder, 'unknown GPUs' with squeue's error."""
        if job_id == UNREACHABLE:
            with self._lock:
                error = self._error or "squeue did not answer"
            return JobQuery(job_id=job_id, gpus=None, state=None, duration=0.0, error=error)
        return self._slurm.query_job(job_id)
