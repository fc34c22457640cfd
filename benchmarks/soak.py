#!/usr/bin/env python3
"""Soak: thousands of demo jobs with random GPU sets and lengths, the daemon SIGKILLed and restarted
every few hundred jobs, and an independent checker for overlaps and orphans.

Each job is made as Slurm makes it on a node with PrologFlags=Contain: its cgroup first, then its
Prolog (`exporter-watchdog prolog`, called in this process to spare an interpreter start per job),
then its first instruction. At that moment the checker scans /proc on its own for a server process
(this daemon's marker in its environment) whose CUDA_VISIBLE_DEVICES meets the job's GPUs: any such
process is an overlap. While the daemon is dead the Prolog's fail-safe path runs; the guard stops
the server at each kill, timed exactly with pidfds opened before the kill.

    .venv/bin/python benchmarks/soak.py [--jobs 5000] [--kill-every 250] [--seed 1]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter_watchdog.act.procs import list_processes, read_environ  # noqa: E402
from exporter_watchdog.act.record import MARKER_ENV, RECORD_ENV  # noqa: E402
from exporter_watchdog.demo.node import DemoError, DemoNode  # noqa: E402
from exporter_watchdog.prolog import run_prolog  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402
from tests.support.faults import pidfds, wait_all_gone  # noqa: E402

GPUS = 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] if ordered else float("nan")


class Checker:
    """Finds this daemon's server processes in /proc, independently of the daemon and its records."""

    def __init__(self, record: Path) -> None:
        self.record = str(record)

    def servers(self) -> list[tuple[int, set[int] | None]]:
        """(pid, GPUs from CUDA_VISIBLE_DEVICES) of every live server process, guards excluded."""
        out = []
        for p in list_processes():
            if not p.alive:
                continue
            env = read_environ(p.pid)
            if env and env.get(MARKER_ENV) and env.get(RECORD_ENV) == self.record:
                value = env.get("CUDA_VISIBLE_DEVICES")
                out.append((p.pid, {int(x) for x in value.split(",") if x} if value is not None else None))
        return out

    def on(self, gpus: set[int]) -> list[int]:
        return [pid for pid, held in self.servers() if held is None or held & gpus]

    def guards(self) -> list[int]:
        out = []
        for p in list_processes():
            try:
                cmd = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"exporter_watchdog.act.guard" in cmd and self.record.encode() in cmd:
                out.append(p.pid)
        return out


def usage(pid: int) -> tuple[float, int, int]:
    """(RSS MiB, open FDs, threads) of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    rss = int(fields["VmRSS"].split()[0]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd")), int(fields["Threads"])


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.daemon = DaemonProc(tmp, {
            "claim": {"gpus": 2, "cooldown_seconds": args.cooldown},
            "server": {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 2.0, "stop_timeout_seconds": 5.0},
            "slurm": {"rescan_seconds": 1.0}, "log": {"level": "INFO"},
        })
        self.node = DemoNode(self.daemon.state_dir / "demo-node", "demo-node", GPUS)
        self.checker = Checker(self.daemon.state_dir / "server.json")
        self.prolog_args = SimpleNamespace(config=str(self.daemon.config_path), timeout=None,
                                           daemon_timeout=2.0, log=None)
        self.lock = threading.Lock()
        self.next_job = 0
        self.jobs = self.overlaps = self.overlaps_during = self.released = 0
        self.waits: list[float] = []  # job cgroup made -> Prolog returned, where a server held its GPUs
        self.kill_to_gone: list[float] = []  # for kills that found a server running
        self.kills = 0
        self.usage: list[tuple[str, tuple[float, int, int]]] = []
        self.down = threading.Event()  # set while no daemon runs
        self.hold = threading.Event()
        self.without_daemon = 0  # jobs whose Prolog ran while no daemon did
        self.errors: list[str] = []

    def submit(self) -> tuple[str, set[int], bool] | None:
        """A job on random free GPUs: (id, GPUs, whether a server held any of them just before)."""
        with self.lock:
            held = {g for j in self.node.jobs() for g in j.gpus}
            free = [g for g in range(GPUS) if g not in held]
            if not free:
                return None
            gpus = set(self.rng.sample(free, min(len(free), self.rng.choice((1, 1, 2)))))
            had_server = bool(self.checker.on(gpus))
            try:
                job = self.node.submit(gpus=sorted(gpus))
            except DemoError:
                return None
            return job.job_id, gpus, had_server

    def run_job(self) -> None:
        made = time.monotonic()
        got = self.submit()
        if got is None:
            time.sleep(0.01)
            return
        job_id, gpus, had_server = got
        no_daemon = self.down.is_set()
        run_prolog(self.prolog_args, {"SLURM_JOB_ID": job_id, "SLURM_JOB_GPUS": ",".join(map(str, sorted(gpus)))})
        started = time.monotonic()  # the job's first instruction
        found = self.checker.on(gpus)
        length = self.rng.uniform(0, self.args.max_len)
        time.sleep(length)
        during = self.checker.on(gpus)
        self.node.cancel(job_id)
        with self.lock:
            self.jobs += 1
            self.without_daemon += no_daemon
            if found:
                self.overlaps += 1
                self.errors.append(f"job {job_id} on GPUs {sorted(gpus)} started beside server pids {found}")
            if during:
                self.overlaps_during += 1
                self.errors.append(f"job {job_id} on GPUs {sorted(gpus)}: server pids {during} started on them")
            if had_server:
                self.released += 1
                self.waits.append(started - made)

    def worker(self, stop: threading.Event) -> None:
        while not stop.is_set():
            while self.hold.is_set() and not stop.is_set():
                time.sleep(0.01)  # a kill is being timed on a serving daemon
            with self.lock:
                if self.next_job >= self.args.jobs:
                    return
                self.next_job += 1
            self.run_job()
            time.sleep(self.rng.uniform(0, self.args.max_gap))

    def kill_and_restart(self) -> None:
        """SIGKILL the daemon (timing how long its server outlives it), keep jobs coming, start it again."""
        d = self.daemon
        self.kills += 1
        self.hold.set()  # no new jobs until the daemon serves: each kill is timed on a live server
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            doc = d.status()
            if doc and doc["state"] == "serving" and doc["server_ready"]:
                break
            time.sleep(0.05)
        self.hold.clear()
        assert d.proc is not None
        self.usage.append((f"daemon {d.proc.pid} before kill", usage(d.proc.pid)))
        pids = [pid for pid, _ in self.checker.servers()]
        fds = pidfds(pids)  # before the kill: a reused pid cannot fool the wait
        killed = time.monotonic()
        d.signal(signal.SIGKILL)
        if pids:
            self.kill_to_gone.append(wait_all_gone(fds, killed, 30.0))
        d.wait_exit(30)
        self.down.set()
        time.sleep(self.rng.uniform(0.5, 3.0))  # jobs arrive while no daemon runs: the Prolog's fail-safe
        d.start(wait_state=None)
        d.wait_status(lambda doc: True, 60, "the daemon answering again")
        self.down.clear()
        self.usage.append((f"daemon {d.proc.pid} after start", usage(d.proc.pid)))

    def run(self) -> int:
        d = self.daemon
        d.start(wait_state="serving", timeout=60)
        assert d.proc is not None
        self.usage.append((f"daemon {d.proc.pid} at start", usage(d.proc.pid)))
        stop = threading.Event()
        workers = [threading.Thread(target=self.worker, args=(stop,)) for _ in range(self.args.concurrency)]
        t0 = time.monotonic()
        for w in workers:
            w.start()
        next_kill = self.args.kill_every
        try:
            while any(w.is_alive() for w in workers):
                if self.jobs >= next_kill and self.next_job < self.args.jobs:
                    self.kill_and_restart()
                    next_kill += self.rng.randint(self.args.kill_every // 2, self.args.kill_every * 3 // 2)
                time.sleep(0.05)
        finally:
            stop.set()
            for w in workers:
                w.join()
        took = time.monotonic() - t0
        assert d.proc is not None
        self.usage.append((f"daemon {d.proc.pid} at end", usage(d.proc.pid)))
        yields = self.daemon_yields()
        d.stop()
        orphans = self.checker.servers()
        guards = self.checker.guards()
        self.report(took, yields, orphans, guards)
        return 0 if not (self.overlaps or self.overlaps_during or orphans or guards) else 1

    def daemon_yields(self) -> int:
        """Yields the daemon logged over all its lives (its counters restart with it)."""
        return self.daemon.log().count(" yielded GPUs ")

    def report(self, took: float, yields: int, orphans: list[tuple[int, set[int] | None]], guards: list[int]) -> None:
        kills = self.kill_to_gone
        print(f"jobs:                 {self.jobs} in {took:.0f} s ({self.args.concurrency} at a time, "
              f"lengths 0-{self.args.max_len:g} s, random GPU sets of 1-2 of {GPUS})")
        print(f"daemon SIGKILLs:      {self.kills} (every ~{self.args.kill_every} jobs), each restarted; "
              f"{len(kills)} found a server running")
        print(f"yields:               {yields} logged by the daemon; {self.released} jobs found a server on their "
              "GPUs at their cgroup")
        print(f"no daemon:            {self.without_daemon} jobs started while no daemon ran (the Prolog's "
              "fail-safe path)")
        print(f"overlaps:             {self.overlaps} at job start, {self.overlaps_during} during a job")
        print(f"orphans at the end:   {len(orphans)} server processes, {len(guards)} guards")
        if self.waits:
            print(f"job wait (yield):     p50 {percentile(self.waits, 50) * 1000:.1f} ms, "
                  f"p99 {percentile(self.waits, 99) * 1000:.1f} ms, max {max(self.waits) * 1000:.1f} ms "
                  f"(cgroup made -> Prolog returned with the server gone, {len(self.waits)} jobs)")
        if kills:
            print(f"kill -9 -> server gone: p50 {percentile(kills, 50) * 1000:.1f} ms, "
                  f"p99 {percentile(kills, 99) * 1000:.1f} ms, max {max(kills) * 1000:.1f} ms ({len(kills)} kills)")
        for what, (rss, fds, threads) in self.usage[:2] + self.usage[-2:]:
            print(f"{what + ':':<32} RSS {rss:.1f} MiB, {fds} FDs, {threads} threads")
        if len(self.usage) > 4:
            worst = max(self.usage, key=lambda u: u[1][0])
            print(f"largest RSS of any daemon life: {worst[1][0]:.1f} MiB ({worst[0]})")
        for line in self.errors[:10]:
            print("  " + line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000)
    parser.add_argument("--kill-every", type=int, default=250, help="SIGKILL the daemon every ~N jobs")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--max-len", type=float, default=0.2, help="longest job, seconds")
    parser.add_argument("--max-gap", type=float, default=0.15, help="longest pause between a worker's jobs")
    parser.add_argument("--cooldown", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    sys.stderr = open(os.devnull, "w")  # the Prolog logs each job; the figures go to stdout
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            return soak.run()
        finally:
            soak.daemon.stop()


if __name__ == "__main__":
    sys.exit(main())
