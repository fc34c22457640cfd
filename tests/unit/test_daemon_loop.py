"""The daemon loop with fakes at its narrow interfaces (Slurm, supervisor, health, clock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from exporter_watchdog.config import load_config
from exporter_watchdog.daemon import Daemon
from exporter_watchdog.metrics.daemon import DaemonMetrics


@dataclass(frozen=True)
class Answer:
    gpus: frozenset[int] | None
    duration: float = 0.01
    error: str | None = None


class FakeSlurm:
    def __init__(self) -> None:
        self.jobs: dict[str, frozenset[int] | None] = {}
        self.delay = 0.0
        self.calls = 0
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def query_job(self, job_id: str) -> Answer:
        with self._lock:
            self.calls += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)  # stands in for a slow scontrol
            gpus = self.jobs.get(job_id)
            return Answer(gpus, error=None if gpus is not None else "timed out")
        finally:
            with self._lock:
                self.active -= 1


@dataclass
class Poll:
    running: bool
    pid: int | None
    exited: bool = False
    exit_code: int | None = None


@dataclass
class Stop:
    duration: float = 0.001
    escalated: bool = False
    remaining: int = 0


class FakeSupervisor:
    def __init__(self) -> None:
        self.started: list[tuple[Sequence[str], Mapping[str, str]]] = []
        self.stops = 0
        self._pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def started_at(self) -> float | None:
        return 0.0 if self._pid else None

    @property
    def stop_method(self) -> str:
        return "fake"

    @property
    def guard_pid(self) -> int | None:
        return None

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: Any = None, gpus: Any = None) -> int:
        self.started.append((argv, env))
        self._pid = 1000 + len(self.started)
        return self._pid

    def poll(self) -> Poll:
        return Poll(running=self._pid is not None, pid=self._pid)

    def stop(self, term_timeout: float | None = None) -> Stop:
        self.stops += 1
        self._pid = None
        return Stop()


class FakeHealth:
    def __init__(self, wake: Callable[[], None]) -> None:
        self.url: str | None = None

    @property
    def ready(self) -> bool:
        return self.url is not None

    def watch(self, url: str | None) -> None:
        self.url = url

    def close(self) -> None:
        pass


def make(tmp_path: Path, **claim: Any) -> tuple[Daemon, FakeSlurm, FakeSupervisor, dict[str, Any], CollectorRegistry,
                                                 list[float]]:
    config = load_config(None, {"state_dir": str(tmp_path), "claim.gpus": claim.get("gpus", 2),
                                "claim.cooldown_seconds": 10.0, "server.profile": "demo", "server.port": 8123})
    slurm, sup = FakeSlurm(), FakeSupervisor()
    dirs: dict[str, Any] = {}
    registry = CollectorRegistry()
    now = [100.0]
    daemon = Daemon(config, node_gpus=4, scan_jobs=lambda: dict(dirs), slurm=slurm, watcher=None, supervisor=sup,
                    health_factory=FakeHealth, metrics=DaemonMetrics(registry), clock=lambda: now[0])
    daemon.start("demo")
    return daemon, slurm, sup, dirs, registry, now


def test_start_yield_failsafe_and_recovery(tmp_path: Path) -> None:
    daemon, slurm, sup, dirs, registry, now = make(tmp_path)
    daemon.tick()
    argv, env = sup.started[-1]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3" and "8123" in argv
    daemon.tick()
    assert daemon.snapshot().phase.value == "serving"

    # Slurm does not answer about a new job: fail safe, yield.
    dirs["17"] = object()
    daemon.tick()
    assert sup.pid is None and sup.stops == 1
    assert registry.get_sample_value("exporter_watchdog_yields_total", {"reason": "slurm_unknown"}) == 1
    assert registry.get_sample_value("exporter_watchdog_slurm_query_errors_total") == 1
    # It stays off while Slurm stays silent, asking again at most once a second.
    calls = slurm.calls
    daemon.tick()
    assert slurm.calls == calls and sup.pid is None
    now[0] += 1.5
    daemon.tick()
    assert slurm.calls == calls + 1 and sup.pid is None

    # Slurm is back: the job holds GPU 0 only; after the cool-down the server comes back on 2,3.
    slurm.jobs["17"] = frozenset({0})
    now[0] += 1.5
    daemon.tick()
    assert sup.pid is None
    now[0] += 10.0
    daemon.tick()
    assert sup.pid is not None and sup.started[-1][1]["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert registry.get_sample_value("exporter_watchdog_jobs_seen_total") == 1


def test_new_jobs_are_asked_about_in_parallel(tmp_path: Path) -> None:
    daemon, slurm, sup, dirs, _, _ = make(tmp_path)
    daemon.tick()
    slurm.delay = 0.2
    for job in ("1", "2", "3", "4"):
        dirs[job] = object()
        slurm.jobs[job] = frozenset({0})
    daemon.tick()
    assert slurm.max_active > 1, "scontrol queries for new jobs must not queue behind each other"
    assert {j.job_id for j in daemon.snapshot().jobs} == {"1", "2", "3", "4"}


def test_cpu_only_and_other_gpu_jobs_do_not_yield(tmp_path: Path) -> None:
    daemon, slurm, sup, dirs, registry, _ = make(tmp_path)
    daemon.tick()
    pid = sup.pid
    for job, gpus in (("5", frozenset()), ("6", frozenset({0, 1}))):
        dirs[job] = object()
        slurm.jobs[job] = gpus
    daemon.tick()
    assert sup.pid == pid and sup.stops == 0
    assert registry.get_sample_value("exporter_watchdog_job_conflicts_total") == 0
    assert daemon.snapshot().gpu_owner[0].value == "slurm" and daemon.snapshot().gpu_owner[2].value == "watchdog"


def test_claim_all_yields_to_any_gpu_job(tmp_path: Path) -> None:
    daemon, slurm, sup, dirs, registry, _ = make(tmp_path, gpus=4)
    daemon.tick()
    assert sup.started[-1][1]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    dirs["9"] = object()
    slurm.jobs["9"] = frozenset({1})
    daemon.tick()
    assert sup.pid is None
    assert registry.get_sample_value("exporter_watchdog_yields_total", {"reason": "job"}) == 1


def test_release_waits_for_the_stop_of_our_gpus_only(tmp_path: Path) -> None:
    daemon, slurm, sup, dirs, registry, _ = make(tmp_path)
    daemon.tick()
    assert daemon.request_release("50", [0], timeout=5.0) == {"ok": True, "released": False, "waited": 0.0}
    answer: dict[str, Any] = {}
    asker = threading.Thread(target=lambda: answer.update(daemon.request_release("51", [3], timeout=30.0)))
    asker.start()
    # The loop has not run: the prolog is still waiting for our server to go.
    asker.join(0.2)
    assert asker.is_alive() and sup.pid is not None
    daemon.tick()
    asker.join(10)
    assert answer["released"] is True and sup.pid is None
    assert registry.get_sample_value("exporter_watchdog_yields_total", {"reason": "prolog"}) == 1
    # The prolog's GPUs stay off-limits until the job's cgroup has come and gone.
    daemon.tick()
    daemon.tick()
    assert 3 not in daemon.state.claimed


def test_release_racing_a_start_still_waits(tmp_path: Path) -> None:
    daemon, slurm, sup, dirs, registry, _ = make(tmp_path)
    from exporter_watchdog.core.decide import decide

    # The core has decided to start on 2,3 but the spawn has not happened yet.
    daemon.state, _ = decide(daemon.state, daemon._observe(100.0), 100.0, daemon.policy)
    assert daemon.state.claimed == (2, 3) and sup.pid is None
    answer: dict[str, Any] = {}
    asker = threading.Thread(target=lambda: answer.update(daemon.request_release("52", [2], timeout=30.0)))
    asker.start()
    asker.join(0.2)
    assert asker.is_alive(), "a release racing a start must wait for that server to stop"
    daemon.tick()
    asker.join(10)
    assert answer["released"] is True


def test_a_job_process_on_our_gpu_makes_it_yield(tmp_path: Path) -> None:
    config = load_config(None, {"state_dir": str(tmp_path), "claim.gpus": 2, "server.profile": "demo"})
    sup, found = FakeSupervisor(), {}
    registry = CollectorRegistry()
    asked: list[tuple[int, ...]] = []

    def job_processes(claimed: tuple[int, ...]) -> dict[str, set[int]]:
        asked.append(claimed)
        return dict(found)

    daemon = Daemon(config, node_gpus=4, scan_jobs=dict, slurm=FakeSlurm(), watcher=None, supervisor=sup,
                    health_factory=FakeHealth, metrics=DaemonMetrics(registry), gpu_job_processes=job_processes,
                    clock=lambda: 5.0)
    daemon.start("demo")
    daemon.tick()
    daemon.tick()
    assert sup.pid is not None and asked[-1] == (2, 3)
    found["88"] = {3}  # NVML shows a process of job 88 (by its cgroup) on GPU 3; no cgroup event seen
    daemon.tick()
    assert sup.pid is None
    assert registry.get_sample_value("exporter_watchdog_yields_total", {"reason": "gpu_process"}) == 1


def test_the_measured_cold_start_is_kept_for_replay(tmp_path: Path) -> None:
    from exporter_watchdog.act.statefile import measured_cold_start

    daemon, _slurm, sup, _dirs, _registry, now = make(tmp_path)
    daemon.tick()  # starts the server at 100
    assert sup.pid is not None and measured_cold_start(tmp_path, "demo") is None
    now[0] += 42.5
    daemon.tick()  # the fake health says ready: 42.5 s from start to ready
    assert daemon.snapshot().phase.value == "serving"
    assert measured_cold_start(tmp_path, "demo") == 42.5
