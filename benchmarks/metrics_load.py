#!/usr/bin/env python3
"""/metrics under load on the demo node: scrape latency, and yield latency unloaded vs loaded.

Runs `exporter-watchdog serve --demo` and times N yields three ways: with nothing scraping; while
200 scrapers loop on keep-alive connections to its /metrics with 50 more connections held open idle;
and, as a control, while the same load hits a second demo daemon (so only the machine's CPUs are
shared, not the daemon's own interpreter). Each yield is timed from just before the job directory
is made to the moment the server process exits (a pidfd turns readable), and by the daemon itself
(first signal of the job -> server gone, from its log). The load runs in a process of its own.
Prints scrape p50/p99 under load, the yield figures and their ratio to the unloaded ones (target
<= 2x), the loop's heartbeat age, and the daemon's threads and RSS before, under and after.

    .venv/bin/python benchmarks/metrics_load.py [--jobs 20] [--scrapers 200] [--idle 50]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exporter_watchdog.demo.node import DemoNode  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402
from tests.support.procstat import heartbeat_age, rss_kib, threads  # noqa: E402
from tests.support.scrapeload import ScrapeResults  # noqa: E402

YIELDED = re.compile(r"yielded GPUs .* in ([0-9.]+) ms")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def start_daemon(tmp: str) -> DaemonProc:
    Path(tmp).mkdir()
    daemon = DaemonProc(Path(tmp), {"claim": {"gpus": 2, "cooldown_seconds": 0.0}, "log": {"level": "INFO"}})
    return daemon.start(timeout=120)


@dataclass
class Phase:
    outside: list[float]  # ms, job directory made -> server process exited
    inside: list[float]  # ms, as the daemon logs it: first signal of the job -> server gone


def yields(daemon: DaemonProc, jobs: int, label: str) -> Phase:
    """Submit `jobs` jobs on a claimed GPU, one at a time, and time each yield."""
    node = DemoNode(daemon.state_dir / "demo-node", "demo-node", 4)
    logged = len(YIELDED.findall(daemon.log()))
    outside = []
    for i in range(jobs):
        doc = daemon.wait_state("serving", 300)
        fd = os.pidfd_open(doc["server_pid"])
        try:
            t0 = time.monotonic()
            job = node.submit(gpus=[doc["claimed_gpus"][i % len(doc["claimed_gpus"])]], seconds=None)
            if not select.select([fd], [], [], 120)[0]:
                raise SystemExit(f"{label}: the server did not stop for job {job.job_id}")
            outside.append((time.monotonic() - t0) * 1000)
        finally:
            os.close(fd)
        node.cancel(job.job_id)
        print(f"\r{label}: {i + 1}/{jobs} yields, last {outside[-1]:.1f} ms", end="", file=sys.stderr)
    print(file=sys.stderr)
    daemon.wait_state("serving", 300)
    inside = [float(v) for v in YIELDED.findall(daemon.log())[logged:]]
    return Phase(outside, inside)


class Sampler(threading.Thread):
    """Samples the daemon's threads and its loop's heartbeat age while the load runs."""

    def __init__(self, daemon: DaemonProc) -> None:
        super().__init__(daemon=True)
        self.target = daemon
        self.threads: list[int] = []
        self.ages: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        pid = self.target.proc.pid  # type: ignore[union-attr]
        while not self.stop.wait(0.5):
            self.threads.append(threads(pid))
            try:
                self.ages.append(heartbeat_age(f"{self.target.url}/metrics", timeout=60))
            except Exception as exc:  # noqa: BLE001 - reported, not fatal
                print(f"heartbeat sample failed: {exc}", file=sys.stderr)


@contextmanager
def scrape_load(port: int, scrapers: int, idle: int, out: list[ScrapeResults]) -> Iterator[None]:
    """The load in a process of its own: 200 threads in this one would delay our own clock reads."""
    load = subprocess.Popen(
        [sys.executable, "-m", "tests.support.scrapeload", "127.0.0.1", str(port), "--scrapers", str(scrapers),
         "--idle", str(idle)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert load.stdout is not None
    try:
        if load.stdout.readline().strip() != "ready":
            raise SystemExit("the load generator did not start")
        yield
    finally:
        stdout, _ = load.communicate("", timeout=300)
    doc = json.loads(stdout)
    out.append(ScrapeResults(doc["statuses"], doc["latencies"], doc["errors"]))


def show(label: str, phase: Phase, base: Phase | None) -> None:
    line = f"{label:<28}"
    for name, values, ref in (("job->exit", phase.outside, base.outside if base else None),
                              ("in-daemon", phase.inside, base.inside if base else None)):
        if not values:
            continue
        p50, p99 = percentile(values, 50), percentile(values, 99)
        line += f"  {name} p50 {p50:6.1f} ms p99 {p99:6.1f} ms"
        if ref:
            line += f" ({p50 / percentile(ref, 50):.2f}x / {p99 / percentile(ref, 99):.2f}x)"
    print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="yields per phase (default 20)")
    parser.add_argument("--scrapers", type=int, default=200)
    parser.add_argument("--idle", type=int, default=50)
    parser.add_argument("--no-control", action="store_true", help="skip the load-on-another-daemon phase")
    args = parser.parse_args()
    results: list[ScrapeResults] = []
    control: Phase | None = None
    with tempfile.TemporaryDirectory(prefix="metrics-load-") as tmp:
        daemon = start_daemon(str(Path(tmp) / "a"))
        other = None
        try:
            pid = daemon.proc.pid  # type: ignore[union-attr]
            daemon.metrics()
            rss0, threads0 = rss_kib(pid), threads(pid)
            unloaded = yields(daemon, args.jobs, "unloaded")
            sampler = Sampler(daemon)
            started = time.monotonic()
            with scrape_load(daemon.metrics_port, args.scrapers, args.idle, results):
                sampler.start()
                loaded = yields(daemon, args.jobs, "loaded")
                rss_load = rss_kib(pid)
                sampler.stop.set()
            window = time.monotonic() - started
            sampler.join()
            time.sleep(1.0)
            rss1, threads1 = rss_kib(pid), threads(pid)
            if not args.no_control:
                other = start_daemon(str(Path(tmp) / "b"))
                with scrape_load(other.metrics_port, args.scrapers, args.idle, []):
                    control = yields(daemon, args.jobs, "load on another daemon")
        finally:
            daemon.stop()
            if other is not None:
                other.stop()
    res = results[0]
    ok = res.statuses.count(200)
    ms = [v * 1000 for v in res.latencies]
    print(f"\n/metrics under load on the demo node ({os.cpu_count()} CPUs): {args.scrapers} scrapers looping on "
          f"keep-alive connections + {args.idle} idle connections, {window:.0f} s")
    print(f"scrapes: {len(ms)} ({len(ms) / window:.0f}/s), answered 200: {ok}, other: {len(ms) - ok}"
          f"{' ' + repr(res.errors[:3]) if res.errors else ''}")
    print(f"scrape latency under load: p50 {percentile(ms, 50):.0f} ms, p99 {percentile(ms, 99):.0f} ms, "
          f"max {max(ms):.0f} ms")
    print(f"\nyield latency, {args.jobs} jobs per row (ratio to unloaded p50 / p99; target <= 2x):")
    show("unloaded", unloaded, None)
    show("loaded", loaded, unloaded)
    if control is not None:
        show("load on another daemon", control, unloaded)
    if sampler.ages:
        print(f"\nloop heartbeat age under load: max {max(sampler.ages):.2f} s over {len(sampler.ages)} samples")
    print(f"daemon threads: {threads0} before, peak {max(sampler.threads or [0])} under load, {threads1} after")
    print(f"daemon RSS: {rss0 / 1024:.1f} MiB before, {rss_load / 1024:.1f} MiB under load, "
          f"{rss1 / 1024:.1f} MiB after")
    return 0


if __name__ == "__main__":
    sys.exit(main())
