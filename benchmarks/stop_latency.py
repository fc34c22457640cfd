"""Measure Supervisor.stop() on a well-behaved server (dies on SIGTERM): p50/p99 over N runs."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from exporter_watchdog.act.supervisor import Supervisor

# Writes a ready file once the interpreter is up, then waits; SIGTERM keeps its default action.
PY_CHILD = "import signal, sys; open(sys.argv[1], 'w').close(); signal.pause()"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, round(q / 100.0 * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def wait_until(pred: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    interval = 0.001
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"child did not start within {timeout}s")
        time.sleep(interval)
        interval = min(interval * 2, 0.05)


def comm_is(pid: int, name: str) -> bool:
    return Path(f"/proc/{pid}/comm").read_text().strip() == name


def wait_file(path: Path, timeout: float) -> None:
    wait_until(path.exists, timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--child", choices=("python", "sleep"), default="python")
    args = ap.parse_args()

    durations: list[float] = []
    with tempfile.TemporaryDirectory(prefix="stop-latency-") as tmp:
        root = Path(tmp)
        sup = Supervisor(root / "server.json", root / "server.log", term_timeout=10.0, kill_timeout=5.0)
        for i in range(args.runs):
            ready = root / f"ready.{i}"
            if args.child == "python":
                argv = [sys.executable, "-c", PY_CHILD, str(ready)]
            else:
                argv = ["sh", "-c", f': > "{ready}"; exec sleep 3600']
            pid = sup.start(argv, {"PATH": "/usr/bin:/bin"})
            wait_file(ready, 30.0)
            if args.child == "sleep":
                # Measure stopping sleep, not a shell half-way through exec.
                wait_until(partial(comm_is, pid, "sleep"), 30.0)
            t0 = time.perf_counter()
            result = sup.stop()
            durations.append(time.perf_counter() - t0)
            if result.escalated or result.remaining:
                raise SystemExit(f"run {i}: unexpected escalation/remaining: {result}")

    ms = [d * 1000.0 for d in durations]
    print(f"stop() on a well-behaved {args.child} child, {args.runs} runs")
    print(f"  p50  {percentile(ms, 50):8.2f} ms")
    print(f"  p99  {percentile(ms, 99):8.2f} ms")
    print(f"  max  {max(ms):8.2f} ms")
    print(f"  mean {statistics.fmean(ms):8.2f} ms")


if __name__ == "__main__":
    main()
