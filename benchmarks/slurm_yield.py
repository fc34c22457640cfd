#!/usr/bin/env python3
"""Yield latency and the Prolog's cost to a job, against a real slurmctld/slurmd (root, Slurm 22.05).

Brings up two one-node clusters (4 fake GPUs, PrologFlags=Contain), one with `exporter-watchdog
prolog` installed as the Prolog and one without, each with a daemon that serves the demo profile
on GPUs 2,3. Jobs alternate between the two clusters, so load from other work on the machine hits
both alike. Per cluster:

- N jobs on a GPU we do not hold (GPU 0): no yield;
- N jobs on one of our GPUs (GPUs 0-1 held by a filler job, so Slurm hands out GPU 2): a yield.

Measured per job: `sbatch` returning -> the job's first instruction (`date +%s.%N`), and for a
yield, the job's cgroup directory appearing (inotify through watchdog on
freezer/slurm_<node>) -> the server process gone (a pidfd turning readable). Prints p50/p99.

    .venv/bin/python benchmarks/slurm_yield.py [--jobs 30]
"""

from __future__ import annotations

import argparse
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from watchdog.events import DirCreatedEvent, FileSystemEvent, FileSystemEventHandler  # noqa: E402
from watchdog.observers.inotify import InotifyObserver  # noqa: E402

from tests.support.daemon import DaemonProc  # noqa: E402
from tests.support.slurm_cluster import CGROUP_ROOT, SlurmCluster, unique_name  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402

JOB_DIR = re.compile(r"/slurm_([^/]+)/uid_\d+/job_(\d+)$")
PROLOG_MS = re.compile(r"job (\d+): .*\((\d+) ms\)")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


class CgroupTimes(FileSystemEventHandler):
    """Monotonic time each job directory was first seen, per node (watchdog repeats some events)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: dict[tuple[str, str], float] = {}
        self.wall: dict[tuple[str, str], float] = {}  # the same moment on the clock `date` reads

    def on_created(self, event: FileSystemEvent) -> None:
        now, wall = time.monotonic(), time.time()
        path = event.src_path if isinstance(event.src_path, str) else event.src_path.decode()
        match = JOB_DIR.search(path)
        if isinstance(event, DirCreatedEvent) and match:
            with self._lock:
                key = (match.group(1), match.group(2))
                if key not in self.seen:
                    self.seen[key], self.wall[key] = now, wall

    def get(self, node: str, job: str) -> float | None:
        with self._lock:
            return self.seen.get((node, job))

    def get_wall(self, node: str, job: str) -> float | None:
        with self._lock:
            return self.wall.get((node, job))


class ExitTime:
    """When a process exits, seen by a thread blocked on its pidfd (opened before the job exists)."""

    def __init__(self, pid: int) -> None:
        self.fd = os.pidfd_open(pid)
        self.at: float | None = None
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        if poller.poll(120_000):
            self.at = time.monotonic()
        os.close(self.fd)

    def wait(self, timeout: float) -> float:
        self._thread.join(timeout)
        if self.at is None:
            raise TimeoutError(f"the server was still running after {timeout:g} s")
        return self.at


@dataclass
class Results:
    start_no_yield: list[float] = field(default_factory=list)  # sbatch returned -> first instruction (s)
    start_yield: list[float] = field(default_factory=list)
    yield_latency: list[float] = field(default_factory=list)  # cgroup dir created -> server gone (s)
    cgroup_to_start: list[float] = field(default_factory=list)  # cgroup dir created -> first instruction (s)
    alive_at_start: int = 0  # yield jobs whose first instruction still saw the server's PID alive
    skipped: int = 0  # yield jobs Slurm did not put on one of our GPUs
    daemon_yields: tuple[float, float] = (0.0, 0.0)  # the daemon's histogram: sum, count
    prolog_wall: list[float] = field(default_factory=list)  # the command run by hand, no GPUs (s)
    prolog_ms: dict[str, list[float]] = field(default_factory=lambda: {"released": [], "not ours": []})


class Side:
    """One cluster and its daemon; the Prolog installed or not."""

    def __init__(self, root: Path, prolog: bool, cgroups: CgroupTimes) -> None:
        self.name = "Prolog" if prolog else "no Prolog"
        self.node = unique_name("wdb")
        folder = root / ("prolog" if prolog else "plain")
        (folder / "d").mkdir(parents=True)
        self.daemon = DaemonProc(folder / "d", {
            "node": {"name": self.node, "gpus": 4},
            "claim": {"gpus": 2, "cooldown_seconds": 0.0},
            "server": {"profile": "demo", "backoff_initial_seconds": 0.5},
            "slurm": {"cgroup_root": str(CGROUP_ROOT), "timeout_seconds": 5.0, "rescan_seconds": 1.0},
            "log": {"level": "INFO"},
        }, demo=False)
        self.prolog_log = folder / "prolog.log"
        command = None
        if prolog:
            command = (f"{sys.executable} -m exporter_watchdog.cli prolog --config {self.daemon.config_path} "
                       f"--log {self.prolog_log}")
        self.cluster = SlurmCluster(folder / "c", node=self.node, prolog=command, prolog_flags="Contain")
        self.daemon.env["SLURM_CONF"] = str(self.cluster.conf)
        self.cgroups = cgroups
        self.out = self.cluster.workdir / "out"
        self.results = Results()
        self.filler: str | None = None

    def start(self) -> None:
        self.cluster.start()
        self.cluster.warm_up()
        self.daemon.start(timeout=120)

    def stop(self) -> list[str]:
        self.daemon.stop()
        return self.cluster.stop() + self.cluster.leftovers()

    def _stamp(self, job: str, timeout: float = 60.0) -> tuple[float, str, set[int]]:
        """The job's first-instruction time, what it saw of the server, and its GPUs."""
        path = self.out / f"{job}.t0"
        wait_for(lambda: path.exists() and path.read_text().count("\n") >= 3, timeout, f"job {job} to start", 0.005)
        t0, server, gpus = path.read_text().splitlines()[:3]
        return float(t0), server, {int(g) for g in gpus.split(",") if g}

    def _submit(self, server_pid: int, then: str) -> tuple[str, float]:
        # First instruction: the time; then whether the server's PID is still alive; then its GPUs.
        command = (f"t=$(date +%s.%N); st=$(sed -n 's/^State:[[:space:]]*//p' /proc/{server_pid}/status 2>/dev/null); "
                   f'case "$st" in ""|Z*|X*) r=gone;; *) r=alive;; esac; '
                   f'printf "%s\\n%s\\n%s\\n" "$t" "$r" "$SLURM_JOB_GPUS" > {self.out}/$SLURM_JOB_ID.t0; {then}')
        job = self.cluster.sbatch(1, command=command)
        return job, time.time()

    def no_yield_job(self) -> None:
        doc = self.daemon.wait_state("serving", 120)
        job, submitted = self._submit(doc["server_pid"], "true")
        t0, server, gpus = self._stamp(job)
        if gpus & set(doc["claimed_gpus"]) or server != "alive":
            raise RuntimeError(f"{self.name}: job {job} on GPUs {gpus} (ours {doc['claimed_gpus']}), server {server}")
        self.results.start_no_yield.append(t0 - submitted)
        self.cluster.wait_job_done(job)

    def fill(self) -> None:
        """Hold GPUs 0-1 with a long job, so the next one-GPU job lands on one of ours."""
        self.filler = self.cluster.sbatch(2, seconds=3600)
        self.cluster.wait_job_running(self.filler)

    def yield_job(self) -> None:
        doc = self.daemon.wait_state("serving", 120)
        ours = set(doc["claimed_gpus"])
        exited = ExitTime(doc["server_pid"])
        job, submitted = self._submit(doc["server_pid"], "exec sleep 300")
        t0, server, gpus = self._stamp(job)
        gone = exited.wait(60)
        created = wait_for(lambda: self.cgroups.get(self.node, job), 30, f"the cgroup event of job {job}", 0.005)
        self.cluster.cancel(job)
        if not gpus & ours:
            self.results.skipped += 1
        else:
            self.results.start_yield.append(t0 - submitted)
            self.results.yield_latency.append(gone - created)
            self.results.cgroup_to_start.append(t0 - (self.cgroups.get_wall(self.node, job) or t0))
            self.results.alive_at_start += server == "alive"
        self.cluster.wait_job_done(job)

    def time_prolog_by_hand(self, runs: int) -> None:
        """Wall time of the Prolog command itself for a job without GPUs: interpreter start and imports."""
        env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES")}
        env["SLURM_JOB_ID"] = "by-hand"
        argv = [sys.executable, "-m", "exporter_watchdog.cli", "prolog", "--config", str(self.daemon.config_path)]
        for _ in range(runs):
            t0 = time.monotonic()
            subprocess.run(argv, env=env, capture_output=True, check=True, timeout=60)
            self.results.prolog_wall.append(time.monotonic() - t0)

    def collect(self) -> None:
        total = count = 0.0
        for family in text_string_to_metric_families(self.daemon.metrics()):
            for sample in family.samples:
                if sample.name == "exporter_watchdog_yield_latency_seconds_sum":
                    total += sample.value
                elif sample.name == "exporter_watchdog_yield_latency_seconds_count":
                    count += sample.value
        self.results.daemon_yields = (total, count)
        if self.prolog_log.exists():
            for line in self.prolog_log.read_text().splitlines():
                match = PROLOG_MS.search(line)
                if match and match.group(1) != self.filler:
                    key = "released" if "released" in line else "not ours" if "not ours" in line else None
                    if key:
                        self.results.prolog_ms[key].append(float(match.group(2)))


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q) * 1000:8.1f}" if values else "     n/a"


def report(plain: Results, prolog: Results, jobs: int) -> None:
    print(f"\nexporter-watchdog against Slurm 22.05, one node with 4 fake GPUs, daemon serving the demo profile "
          f"on GPUs 2,3; {jobs} jobs per case, {os.cpu_count()} CPUs")
    lat = plain.yield_latency
    print(f"\nyield latency without the Prolog (job cgroup dir created -> server process gone), {len(lat)} jobs:")
    print(f"  p50 {ms(lat, 50).strip()} ms   p99 {ms(lat, 99).strip()} ms   "
          f"mean {statistics.mean(lat) * 1000:.1f} ms   max {max(lat) * 1000:.1f} ms")
    gap = plain.cgroup_to_start
    print(f"  job cgroup dir created -> the job's first instruction (the daemon's head start): "
          f"p50 {ms(gap, 50).strip()} ms, p99 {ms(gap, 99).strip()} ms, min {min(gap) * 1000:.1f} ms")
    for name, res in (("no Prolog", plain), ("Prolog", prolog)):
        total, count = res.daemon_yields
        mean = f"{total / count * 1000:.1f} ms" if count else "n/a"
        print(f"  daemon's exporter_watchdog_yield_latency_seconds ({name}): mean {mean} over {count:.0f} yields")
    print(f"  server still alive at the job's first instruction: {plain.alive_at_start}/{len(plain.start_yield)} "
          f"jobs without the Prolog, {prolog.alive_at_start}/{len(prolog.start_yield)} with it")
    if plain.skipped or prolog.skipped:
        print(f"  (left out: {plain.skipped} + {prolog.skipped} jobs that Slurm put on none of our GPUs)")

    print("\njob start delay (sbatch returned -> the job's first instruction), ms:")
    print(f"  {'case':<16}{'no Prolog p50':>14}{'p99':>9}{'Prolog p50':>12}{'p99':>9}{'added p50':>11}{'p99':>9}")
    for case, a, b in (("with a yield", plain.start_yield, prolog.start_yield),
                       ("without a yield", plain.start_no_yield, prolog.start_no_yield)):
        added = [(percentile(b, q) - percentile(a, q)) * 1000 for q in (50, 99)] if a and b else [0.0, 0.0]
        print(f"  {case:<16}{ms(a, 50):>14}{ms(a, 99):>9}{ms(b, 50):>12}{ms(b, 99):>9}"
              f"{added[0]:>11.1f}{added[1]:>9.1f}")
    if prolog.prolog_wall:
        print(f"  the Prolog command run by hand for a job without GPUs (interpreter start, imports), "
              f"{len(prolog.prolog_wall)} runs: p50 {ms(prolog.prolog_wall, 50).strip()} ms, "
              f"p99 {ms(prolog.prolog_wall, 99).strip()} ms")
    for key, values in prolog.prolog_ms.items():
        if values:
            print(f"  the Prolog's own log, GPUs {key}: p50 {percentile(values, 50):.0f} ms, "
                  f"p99 {percentile(values, 99):.0f} ms (from its start, without the interpreter's)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=30, help="jobs per case (default 30)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root: the test cluster makes device nodes and job cgroups")

    # watchdog warns (with a repr of every watch) when a new directory's IN_CREATE arrives after its
    # recursive walk already watched it: harmless, and every job makes it.
    warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)
    cgroups = CgroupTimes()
    observer = InotifyObserver()
    sides: list[Side] = []
    problems: list[str] = []
    finished = False
    with tempfile.TemporaryDirectory(prefix="slurm-yield-") as tmp:
        try:
            sides = [Side(Path(tmp), False, cgroups), Side(Path(tmp), True, cgroups)]
            for side in sides:
                side.start()
                # slurmd makes freezer/slurm_<node> at start; job directories appear below it.
                observer.schedule(cgroups, str(CGROUP_ROOT / "freezer" / f"slurm_{side.node}"), recursive=True)
            observer.start()
            for i in range(args.jobs):
                for side in sides:
                    side.no_yield_job()
                print(f"\rno yield: {i + 1}/{args.jobs}", end="", file=sys.stderr)
            print(file=sys.stderr)
            sides[1].time_prolog_by_hand(10)
            for side in sides:
                side.fill()
            for i in range(args.jobs):
                for side in sides:
                    side.yield_job()
                print(f"\ryield: {i + 1}/{args.jobs}", end="", file=sys.stderr)
            print(file=sys.stderr)
            for side in sides:
                side.collect()
            finished = True
        finally:
            if observer.is_alive():
                observer.stop()
                observer.join(10)
            for side in sides:
                try:
                    problems += side.stop()
                except Exception as exc:  # keep stopping the other side
                    problems.append(f"{side.name}: {exc!r}")
    if problems:
        print(f"teardown left things behind: {problems}", file=sys.stderr)
    if finished:
        report(sides[0].results, sides[1].results, args.jobs)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
