#!/usr/bin/env python3
"""Yield latency on the demo node: job cgroup directory created -> server process gone.

Runs `exporter-watchdog serve --demo` once with inotify detection and once with 0.25 s polling,
submits N jobs on a claimed GPU, and times each from just before the job directory is made to the
moment the server's process exits (a pidfd turns readable). Prints p50, p99 and the ratio.

    .venv/bin/python benchmarks/yield_latency.py [--jobs 100]
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter_watchdog.demo.node import DemoNode  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402


def wait_exit(fd: int, timeout: float) -> float:
    """Block until the process behind pidfd `fd` exits; return the monotonic time it did."""
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise TimeoutError(f"server still running after {timeout} s")
        return time.monotonic()
    finally:
        os.close(fd)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def run_mode(mode: str, jobs: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix=f"yield-{mode}-") as tmp:
        daemon = DaemonProc(Path(tmp), {
            "claim": {"gpus": 2, "cooldown_seconds": 0.0},
            "slurm": {"detect": mode, "poll_interval_seconds": 0.25},
            "log": {"level": "WARNING"},
        })
        latencies = []
        try:
            daemon.start(timeout=120)
            node = DemoNode(daemon.state_dir / "demo-node", "demo-node", 4)
            for i in range(jobs):
                doc = daemon.wait_state("serving", 120)
                pid = doc["server_pid"]
                gpu = doc["claimed_gpus"][i % len(doc["claimed_gpus"])]  # always one we hold
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    raise SystemExit(f"server {pid} exited before job {i}:\n{daemon.log()[-3000:]}") from None
                t0 = time.monotonic()
                job = node.submit(gpus=[gpu], seconds=None)
                gone = wait_exit(fd, 60)
                latencies.append(gone - t0)
                node.cancel(job.job_id)
                print(f"\r{mode}: {i + 1}/{jobs} jobs, last {latencies[-1] * 1000:.1f} ms", end="", file=sys.stderr)
            print(file=sys.stderr)
        finally:
            daemon.stop()
        return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100, help="jobs per mode (default 100)")
    args = parser.parse_args()
    results = {mode: run_mode(mode, args.jobs) for mode in ("inotify", "poll")}
    print(f"\nyield latency on the demo node, {args.jobs} jobs per mode ({os.cpu_count()} CPUs)")
    print(f"{'mode':<10}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}")
    for mode, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"{mode:<10}{percentile(ms, 50):>10.1f}{percentile(ms, 99):>10.1f}"
              f"{statistics.mean(ms):>10.1f}{max(ms):>10.1f}")
    ino, poll = results["inotify"], results["poll"]
    ratio = percentile(poll, 50) / percentile(ino, 50)
    print(f"\npoll p50 / inotify p50 = {ratio:.1f}x (target >= 5x); "
          f"inotify p99 = {percentile(ino, 99) * 1000:.1f} ms (target < 50 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
