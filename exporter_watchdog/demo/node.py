"""The embedded demo node: job cgroups are directories in a scratch folder, and scontrol answers from them."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from exporter_watchdog.detect.runner import CommandResult

PARTITION = "demo"
# Simulated job processes get PIDs above the kernel's pid_max (2^22), so they never name a real process.
JOB_PID_BASE = 1 << 23


def job_pid(job_id: str) -> int:
    """The PID a demo job's simulated process shows on its GPUs."""
    return JOB_PID_BASE + int(job_id)


class DemoError(Exception):
    """A demo job request that cannot be met (bad GPU index, GPUs taken, unknown job)."""


@dataclass(frozen=True)
class DemoJob:
    job_id: str
    gpus: tuple[int, ...]
    submitted_at: float  # wall clock
    ends_at: float | None  # wall clock; None: until cancelled


class DemoNode:
    """A node of `gpus` simulated GPUs whose Slurm jobs live under `root` (shared by daemon and CLI)."""

    def __init__(self, root: Path, node: str, gpus: int, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.node = node
        self.gpus = gpus
        self._clock = clock
        self.cgroup_root = root / "cgroup"
        self.jobs_dir = root / "jobs"
        # The layout of Debian's Slurm (cgroup v1, built with multiple slurmd): freezer/slurm_<node>/uid_U/job_N.
        self.base = self.cgroup_root / "freezer" / f"slurm_{node}"
        self.user_dir = self.base / f"uid_{os.getuid()}"

    def prepare(self) -> None:
        """Create the node's directories (the daemon does this at start)."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)

    @property
    def exists(self) -> bool:
        return self.base.is_dir() and self.jobs_dir.is_dir()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.jobs_dir / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self, path: Path) -> DemoJob | None:
        try:
            data = json.loads(path.read_text())
            return DemoJob(job_id=str(data["job_id"]), gpus=tuple(int(g) for g in data["gpus"]),
                           submitted_at=float(data["submitted_at"]),
                           ends_at=None if data["ends_at"] is None else float(data["ends_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def jobs(self) -> list[DemoJob]:
        out = [j for p in self.jobs_dir.glob("*.json") if (j := self._read(p)) is not None]
        return sorted(out, key=lambda j: int(j.job_id))

    def job(self, job_id: str) -> DemoJob | None:
        if not job_id.isdigit():
            return None
        return self._read(self.jobs_dir / f"{job_id}.json")

    def submit(self, gpus: Sequence[int] | None = None, count: int | None = None,
               seconds: float | None = None) -> DemoJob:
        """Start a job on `gpus` (or the `count` lowest free ones, as Slurm picks); CPU-only when neither."""
        if not self.exists:
            raise DemoError(f"no demo node at {self.root} (start one with: exporter-watchdog serve --demo)")
        with self._locked():
            held = {g for j in self.jobs() for g in j.gpus}
            if gpus is not None:
                chosen = tuple(sorted(set(gpus)))
                bad = [g for g in chosen if not 0 <= g < self.gpus]
                if bad:
                    raise DemoError(f"--gpus {','.join(map(str, chosen))}: the demo node has GPUs 0-{self.gpus - 1}")
                taken = sorted(set(chosen) & held)
                if taken:
                    raise DemoError(f"GPU(s) {','.join(map(str, taken))} are held by another demo job")
            elif count:
                free = [g for g in range(self.gpus) if g not in held]
                if len(free) < count:
                    raise DemoError(f"only {len(free)} GPU(s) free, asked for {count}")
                chosen = tuple(free[:count])
            else:
                chosen = ()
            counter = self.jobs_dir / ".next"
            try:
                job_id = int(counter.read_text().strip() or "1")
            except (OSError, ValueError):
                job_id = 1
            counter.write_text(str(job_id + 1))
            now = self._clock()
            job = DemoJob(str(job_id), chosen, now, None if not seconds else now + seconds)
            # Metadata first, directory second: scontrol must answer as soon as the cgroup is visible.
            (self.jobs_dir / f"{job_id}.json").write_text(json.dumps(asdict(job)))
            job_dir = self.user_dir / f"job_{job_id}"
            (job_dir / "step_extern").mkdir(parents=True, exist_ok=True)
            (job_dir / "step_batch").mkdir(exist_ok=True)
        return job

    def cancel(self, job_id: str) -> DemoJob:
        job = self.job(job_id)
        if job is None:
            raise DemoError(f"no demo job {job_id}")
        self._remove(job)
        return job

    def _remove(self, job: DemoJob) -> None:
        # The cgroup goes first (as in Slurm, the job is over), then the record scontrol reads.
        shutil.rmtree(self.user_dir / f"job_{job.job_id}", ignore_errors=True)
        (self.jobs_dir / f"{job.job_id}.json").unlink(missing_ok=True)

    def expire(self) -> float | None:
        """End the jobs whose time is up; return the wall time the next one ends, if any."""
        now = self._clock()
        upcoming = []
        for job in self.jobs():
            if job.ends_at is None:
                continue
            if job.ends_at <= now:
                self._remove(job)
            else:
                upcoming.append(job.ends_at)
        return min(upcoming) if upcoming else None

    def clear(self) -> None:
        """End every job (the daemon does this when the demo stops)."""
        for job in self.jobs():
            self._remove(job)

    def read_cgroup(self, pid: int) -> list[str] | None:
        """/proc/PID/cgroup of a demo job's simulated process (its job cgroup here); None for any other PID."""
        if pid < JOB_PID_BASE:
            return None
        job_id = str(pid - JOB_PID_BASE)
        return [f"4:freezer:/slurm_{self.node}/uid_{os.getuid()}/job_{job_id}/step_batch/task_0"]

    # --- the scontrol stand-in ---------------------------------------------------------------------

    def scontrol(self, argv: Sequence[str], timeout: float) -> CommandResult:
        """Answer `scontrol show job -d -o ID` the way Slurm 22.05 does, from the job records."""
        args = [a for a in argv[1:] if not a.startswith("-")]
        if len(args) != 3 or args[:2] != ["show", "job"]:
            return CommandResult(1, "", f"demo scontrol: unsupported command {' '.join(argv)}\n")
        job = self.job(args[2])
        if job is None:
            return CommandResult(1, "", "slurm_load_jobs error: Invalid job id specified\n")
        return CommandResult(0, self.render(job) + "\n", "")

    def render(self, job: DemoJob) -> str:
        uid = os.getuid()
        user = f"u{uid}" if uid else "root"
        gres = f"gpu:{len(job.gpus)}(IDX:{_ranges(job.gpus)})" if job.gpus else ""
        tres = "cpu=1,mem=0,node=1,billing=1" + (f",gres/gpu={len(job.gpus)}" if job.gpus else "")
        run = int(max(self._clock() - job.submitted_at, 0))
        return (
            f"JobId={job.job_id} JobName=demo UserId={user}({uid}) GroupId={user}({uid}) Partition={PARTITION}"
            f" JobState=RUNNING"
            f" Reason=None RunTime=00:00:{min(run, 59):02d} NodeList={self.node} BatchHost={self.node}"
            f" NumNodes=1 NumCPUs=1 TRES={tres} {'JOB_GRES=gpu:' + str(len(job.gpus)) + ' ' if job.gpus else ''}"
            f"Nodes={self.node} CPU_IDs=0 Mem=0 GRES={gres} MinCPUsNode=1 Command=(null)"
        )


def _ranges(indices: Sequence[int]) -> str:
    """(0, 2, 3) -> '0,2-3', as Slurm writes index lists."""
    items = sorted(indices)
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)


class DemoReaper:
    """Ends demo jobs when their time is up (a thread in the daemon)."""

    def __init__(self, node: DemoNode, clock: Callable[[], float] = time.time) -> None:
        self._node = node
        self._clock = clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            next_end = self._node.expire()
            # New jobs are not announced to the reaper: look again at least every half second.
            wait = 0.5 if next_end is None else min(max(next_end - self._clock(), 0.0), 0.5)
            self._stop.wait(wait)
