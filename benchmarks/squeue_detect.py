#!/usr/bin/env python3
"""How long the server overlaps a job with `slurm.detect: squeue` (no job cgroups, no Prolog), per interval.

Brings up a one-node Slurm configured like a container (proctrack/linuxproc, task/none: no job
cgroups, 4 fake GPUs) and, for each squeue interval, a daemon that serves the demo profile on GPUs
2,3. A filler job holds GPUs 0-1, so each measured job gets GPU 2 and the daemon must yield. Per job:
the job's first instruction (`date +%s.%N`) -> the server process gone (a pidfd turning readable);
negative when the listing caught the job before its first instruction.
Without the Prolog this overlap is what the listing alone leaves; expect about half an interval on
average and up to one interval plus the squeue and scontrol calls. Prints p50/p99/max.

    .venv/bin/python benchmarks/squeue_detect.py [--jobs 10] [--intervals 0.5,1,2]
"""

from __future__ import annotations

import argparse
import os
import random
import select
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.daemon import DaemonProc  # noqa: E402
from tests.support.slurm_cluster import SlurmCluster, unique_name  # noqa: E402
from tests.support.waiting import wait_for  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def gone_at(pid: int, timeout: float = 60.0) -> float:
    """Wall-clock time the process exits (pidfd readable)."""
    fd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"server pid {pid} did not exit within {timeout} s")
        return time.time()
    finally:
        os.close(fd)


def first_instruction(out: Path) -> float:
    """The wall-clock time the job printed first."""
    wait_for(lambda: out.exists() and out.read_text().strip(), 60, f"the first line of {out}")
    return float(out.read_text().split()[0])


def run_interval(cluster: SlurmCluster, workdir: Path, interval: float, jobs: int) -> list[float]:
    folder = workdir / f"daemon-{interval:g}"
    folder.mkdir()
    config = {
        "node": {"name": cluster.node, "gpus": 4},
        "claim": {"gpus": 2, "cooldown_seconds": 0.5},
        "server": {"profile": "demo", "backoff_initial_seconds": 0.5},
        "slurm": {"detect": "squeue", "squeue_interval_seconds": interval, "timeout_seconds": 2.0},
        "log": {"level": "INFO"},
    }
    daemon = DaemonProc(folder, config, demo=False, env={"SLURM_CONF": str(cluster.conf)})
    overlaps: list[float] = []
    filler = cluster.sbatch(2, 3600)
    cluster.wait_job_running(filler)
    try:
        daemon.start(wait_state="serving", timeout=90)
        for i in range(jobs):
            doc = daemon.wait_state("serving", 90)
            pid = doc["server_pid"]
            # A random phase against the daemon's polling, so the jobs sample the whole interval.
            time.sleep(random.uniform(0, interval))
            out = workdir / f"job-{interval:g}-{i}.out"
            job = cluster.sbatch(1, command="date +%s.%N; sleep 300", extra=["-o", str(out)])
            gone = gone_at(pid)
            started = first_instruction(out)
            overlaps.append(gone - started)
            cluster.cancel(job)
            cluster.wait_job_done(job)
    finally:
        daemon.stop()
        cluster.cancel(filler)
        cluster.wait_queue_empty()
    return overlaps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--intervals", default="0.5,1,2")
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="squeue-bench-"))
    cluster = SlurmCluster(workdir / "slurm", node=unique_name("wdb"), no_cgroups=True).start()
    try:
        cluster.warm_up()
        print(f"{'interval':>9} {'jobs':>5} {'p50 ms':>9} {'p99 ms':>9} {'max ms':>9}")
        for interval in intervals:
            values = run_interval(cluster, workdir, interval, args.jobs)
            print(f"{interval:>8g}s {len(values):>5} {percentile(values, 50) * 1000:>9.0f} "
                  f"{percentile(values, 99) * 1000:>9.0f} {max(values) * 1000:>9.0f}", flush=True)
    finally:
        problems = cluster.stop()
        if not problems:
            shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        print(f"teardown problems: {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
