"""Scrape cost of /metrics with 8 simulated GPUs against bare prometheus_client, and idle CPU/RSS of a process.

The node is busy: the server holds GPUs 4-7, Slurm jobs hold GPUs 0-3 (so their series carry hpc_job
and job info and per-job memory are exported), and GPM profiling samples every GPU in the background.

    .venv/bin/python benchmarks/scrape_bench.py                 # scrape comparison (target: <= 1.0x)
    .venv/bin/python benchmarks/scrape_bench.py --idle 60       # + idle CPU/RSS of an exporter-only process
    .venv/bin/python benchmarks/scrape_bench.py --idle 60 --idle-cmd "exporter-watchdog serve --demo --exporter-only"
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client import CollectorRegistry, Gauge, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter_watchdog.core.model import Job, Owner, Phase, Snapshot, YieldReason  # noqa: E402
from exporter_watchdog.demo.gpus import SimulatedGpus  # noqa: E402
from exporter_watchdog.metrics.daemon import DaemonMetrics, SnapshotCollector, snapshot_owners  # noqa: E402
from exporter_watchdog.metrics.exposition import Guarded, render_text  # noqa: E402
from exporter_watchdog.metrics.gpm import GpmSampler  # noqa: E402
from exporter_watchdog.metrics.gpu import GpuCollector, XidWatcher  # noqa: E402
from exporter_watchdog.metrics.http import MetricsServer  # noqa: E402
from exporter_watchdog.metrics.jobs import JobInfoCollector, JobMap  # noqa: E402

GPUS = 8
# What Prometheus 2.x sends: it asks for OpenMetrics first, and always for gzip.
PROM_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "Accept-Encoding": "gzip",
}


CLAIMED = (4, 5, 6, 7)
# Two Slurm jobs on the other half: 101 on GPUs 0-1, 102 on GPUs 2-3; each has one process per GPU.
JOBS = {"101": (0, 1), "102": (2, 3)}
JOB_PID = {job: 4_200_000 + int(job) for job in JOBS}  # above pid_max: never a real process
JOB_OF_GPU = {g: job for job, gpus in JOBS.items() for g in gpus}


def job_cgroup(pid: int) -> list[str] | None:
    """/proc/PID/cgroup of the jobs' processes (Slurm's cgroup v2 layout); None for other PIDs."""
    for job, job_pid in JOB_PID.items():
        if pid == job_pid:
            return [f"0::/system.slice/slurmstepd.scope/job_{job}/step_0/user/task_0"]
    return None


def processes(gpu: int) -> list[tuple[int, int]]:
    if gpu in CLAIMED:
        return [(os.getpid(), 20 << 30)]
    return [(JOB_PID[JOB_OF_GPU[gpu]], 12 << 30)]


def full_registry(cache_seconds: float) -> tuple[CollectorRegistry, XidWatcher, GpmSampler]:
    """Everything a serving daemon exports, over 8 simulated GPUs: the server on 4, two jobs on the rest."""
    jobs = tuple(Job(job, frozenset(gpus), 0.0, user="alice", partition="gpu") for job, gpus in JOBS.items())
    snap = Snapshot(node="bench", phase=Phase.SERVING, node_gpus=GPUS, claimed_gpus=CLAIMED,
                    gpu_owner={g: Owner.WATCHDOG if g in CLAIMED else Owner.SLURM for g in range(GPUS)},
                    jobs=jobs, profile="demo", model="demo/model", server_pid=os.getpid(), server_ready=True,
                    server_started_at=time.time())
    gpus = SimulatedGpus(GPUS, lambda: 0.6, processes=processes)
    xids = XidWatcher(gpus).start()
    gpm = GpmSampler(gpus, interval=1.0).start()
    gpus.inject_xid(3, 79)
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry)
    for reason in YieldReason:
        metrics.yielded(reason, 0.02)
    metrics.detected(0.001)
    metrics.slurm_query(0.05, ok=True)
    registry.register(Guarded(SnapshotCollector(lambda: snap), "snapshot"))
    job_map = JobMap(lambda: snap)
    registry.register(Guarded(JobInfoCollector(job_map), "job_info"))
    registry.register(GpuCollector(gpus, "bench", owners=snapshot_owners(lambda: snap),
                                   server_pids=lambda: {os.getpid()}, cache_seconds=cache_seconds, xids=xids,
                                   read_cgroup=job_cgroup, node_gpus=GPUS, jobs=job_map, gpm=gpm))
    return registry, xids, gpm


def mirror_registry(text: str) -> tuple[CollectorRegistry, int]:
    """Plain prometheus_client gauges holding the same series (names, labels, values) as `text`."""
    registry = CollectorRegistry()
    series = 0
    gauges: dict[tuple[str, tuple[str, ...]], Gauge] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name = s.name if not s.name.endswith("_total") else s.name[:-6] + "_count_total"
            # A GPU held by a job has one label more (hpc_job) than a free one: a gauge per label set.
            key = (name, tuple(s.labels))
            gauge = gauges.get(key)
            if gauge is None:
                variant = name if not any(k[0] == name for k in gauges) else f"{name}_{len(gauges)}"
                gauge = Gauge(variant, family.documentation or "mirror", list(s.labels), registry=registry)
                gauges[key] = gauge
            (gauge.labels(**s.labels) if s.labels else gauge).set(s.value)
            series += 1
    return registry, series


def scrape_times(urls: dict[str, str], rounds: int, warmup: int = 20) -> dict[str, list[float]]:
    """Scrape each URL in turn, round after round, so both see the same machine noise."""
    times: dict[str, list[float]] = {k: [] for k in urls}
    with httpx.Client(headers=PROM_HEADERS, timeout=10) as client:
        for i in range(warmup + rounds):
            for key, url in urls.items():
                started = time.perf_counter()
                r = client.get(url)
                elapsed = time.perf_counter() - started
                r.raise_for_status()
                if i >= warmup:
                    times[key].append(elapsed)
    return times


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(int(len(values) * q), len(values) - 1)]


def compare(rounds: int) -> None:
    ours_fresh, xids_a, gpm_a = full_registry(cache_seconds=0.0)  # every scrape a full NVML pass
    ours_cached, xids_b, gpm_b = full_registry(cache_seconds=1.0)
    # Profiling needs two samples: wait for them, so the series compared include every GPM family.
    deadline = time.monotonic() + 10
    while not (len(gpm_a.values()) == GPUS and len(gpm_b.values()) == GPUS) and time.monotonic() < deadline:
        time.sleep(0.1)
    a = MetricsServer("127.0.0.1:0", ours_fresh, dict, lambda: True).start()
    b = MetricsServer("127.0.0.1:0", ours_cached, dict, lambda: True).start()
    try:
        text = httpx.get(f"http://127.0.0.1:{a.port}/metrics").text
        bare_registry, series = mirror_registry(text)
        bare_server, bare_thread = start_http_server(0, addr="127.0.0.1", registry=bare_registry)
        bare_port = bare_server.server_address[1]
        ours_series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        try:
            urls = {"ours (NVML pass per scrape)": f"http://127.0.0.1:{a.port}/metrics",
                    "ours (1 s cache)": f"http://127.0.0.1:{b.port}/metrics",
                    "bare prometheus_client": f"http://127.0.0.1:{bare_port}/metrics"}
            times = scrape_times(urls, rounds)
        finally:
            bare_server.shutdown()
            bare_server.server_close()
            bare_thread.join(5)
        pass_ms = (ours_fresh.get_sample_value("exporter_watchdog_gpu_collect_duration_seconds") or 0) * 1000
        render = {"ours: NVML pass + render_text": render_times(lambda: render_text(ours_fresh), rounds),
                  "bare: generate_latest": render_times(lambda: generate_latest(bare_registry), rounds)}
    finally:
        a.stop()
        b.stop()
        xids_a.stop()
        xids_b.stop()
        gpm_a.stop()
        gpm_b.stop()
    bare = statistics.median(times["bare prometheus_client"])
    tagged = sum(1 for line in text.splitlines() if 'hpc_job="1' in line)
    profiling = sum(1 for line in text.splitlines() if line.startswith("DCGM_FI_PROF_"))
    print(f"{GPUS} simulated GPUs (server on 4, jobs on 4, GPM on), all families: {ours_series} series ours "
          f"({tagged} with hpc_job, {profiling} profiling), {series} series bare; "
          f"{rounds} scrapes each, interleaved, Prometheus' Accept headers (gzip)")
    print(f"{'server':<30} {'median ms':>10} {'p90 ms':>8} {'ratio':>6}")
    for key, values in times.items():
        median = statistics.median(values)
        print(f"{key:<30} {median * 1000:>10.3f} {pct(values, 0.9) * 1000:>8.3f} {median / bare:>6.2f}")
    print(f"one simulated NVML pass over {GPUS} GPUs: {pass_ms:.3f} ms; target: ratio <= 1.0")
    print("in-process, no HTTP (same series):")
    base = statistics.median(render["bare: generate_latest"])
    for key, values in render.items():
        median = statistics.median(values)
        print(f"  {key:<32} {median * 1000:>8.3f} ms median {median / base:>6.2f}")


def render_times(fn: Callable[[], bytes], rounds: int) -> list[float]:
    out: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def process_cpu_rss(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, RSS in MB) of a process, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.startswith("VmRSS:"))
    return cpu, rss_kb / 1024


def measure_idle(pid: int, seconds: float, scrape: Callable[[], None] | None = None,
                 scrape_every: float = 15.0) -> tuple[float, float]:
    """(% of one core, RSS MB) of `pid` over `seconds`, scraped every `scrape_every` s as Prometheus would."""
    cpu0, _ = process_cpu_rss(pid)
    started = time.monotonic()
    next_scrape = started
    while (now := time.monotonic()) < started + seconds:
        if scrape is not None and now >= next_scrape:
            scrape()
            next_scrape += scrape_every
        time.sleep(min(0.5, max(started + seconds - now, 0.0)))
    cpu1, rss = process_cpu_rss(pid)
    return 100.0 * (cpu1 - cpu0) / (time.monotonic() - started), rss


def serve_exporter_only(port_file: Path) -> None:
    """The exporter-only pieces over 8 simulated GPUs, in this process, until SIGTERM."""
    gpus = SimulatedGpus(GPUS, lambda: 0.0)
    xids = XidWatcher(gpus).start()
    registry = CollectorRegistry()
    registry.register(GpuCollector(gpus, "bench", xids=xids))
    server = MetricsServer("127.0.0.1:0", registry, dict, lambda: True).start()
    port_file.write_text(str(server.port))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop()
    xids.stop()


def idle(seconds: float, cmd: str | None, url: str | None) -> None:
    port_file = Path(f"/tmp/scrape-bench-{os.getpid()}.port")
    if cmd is None:
        argv = [sys.executable, __file__, "--serve-exporter-only", str(port_file)]
        what = f"exporter-only pieces, {GPUS} simulated GPUs"
    else:
        argv = shlex.split(cmd)
        what = cmd
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while url is None:
            if port_file.exists() and port_file.read_text():
                url = f"http://127.0.0.1:{port_file.read_text()}/metrics"
            elif time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what}: no port after 60 s")
            time.sleep(0.1)
        while True:
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"{what}: {url} did not answer within 60 s")
            time.sleep(0.2)
        time.sleep(2.0)  # let start-up work settle before the window opens
        target = url

        def scrape() -> None:
            httpx.get(target, headers=PROM_HEADERS).raise_for_status()

        cpu, rss = measure_idle(proc.pid, seconds, scrape=scrape)
        print(f"idle over {seconds:.0f} s ({what}; scraped every 15 s): CPU {cpu:.3f}% of a core "
              f"(target < 0.5%), RSS {rss:.1f} MB (target < 80 MB)")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        port_file.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=400, help="scrapes per server (default 400)")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="also measure idle CPU and RSS of an exporter process over SECONDS")
    parser.add_argument("--idle-cmd", help="command to measure instead of the built-in exporter-only process")
    parser.add_argument("--idle-url", help="its /metrics URL (needed with --idle-cmd)")
    parser.add_argument("--serve-exporter-only", type=Path, metavar="PORT_FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_exporter_only:
        serve_exporter_only(args.serve_exporter_only)
        return
    if args.idle_cmd and not args.idle_url:
        parser.error("--idle-cmd needs --idle-url")
    if args.rounds > 0:
        compare(args.rounds)
    if args.idle > 0:
        idle(args.idle, args.idle_cmd, args.idle_url)


if __name__ == "__main__":
    main()
