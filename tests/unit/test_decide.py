"""The decision core, table-driven: time is an argument, so a day of jobs runs in microseconds."""

from __future__ import annotations

import ast
from dataclasses import replace
from pathlib import Path

import pytest

from exporter_watchdog.core.decide import backoff_delay, decide, gpu_owners, pick_gpus
from exporter_watchdog.core.model import (
    CountConflict,
    Job,
    JobSource,
    Observation,
    Owner,
    Phase,
    Policy,
    ServerObs,
    StartServer,
    State,
    StopServer,
    YieldReason,
)

POLICY = Policy(claim_gpus=2, cooldown_seconds=30, startup_timeout_seconds=600,
                backoff_initial_seconds=5, backoff_max_seconds=60, stable_after_seconds=120)
UP = ServerObs(running=True, ready=True, pid=100)
STARTING = ServerObs(running=True, ready=False, pid=100)
DOWN = ServerObs()


def job(jid: str, gpus: set[int] | None, seen: float = 0.0, source: JobSource = JobSource.CGROUP) -> Job:
    return Job(job_id=jid, gpus=None if gpus is None else frozenset(gpus), seen_at=seen, source=source)


def obs(*jobs: Job, server: ServerObs = DOWN, gpus: int = 4, **kw: object) -> Observation:
    return Observation(node_gpus=gpus, jobs=tuple(jobs), server=server, **kw)  # type: ignore[arg-type]


def serving(claimed: tuple[int, ...] = (2, 3)) -> State:
    return State(phase=Phase.SERVING, claimed=claimed, phase_since=0.0, ever_started=True)


@pytest.mark.parametrize(
    ("busy", "count", "expected"),
    [
        (set(), 2, (2, 3)),  # highest indices first
        ({3}, 2, (1, 2)),
        ({0, 1}, 2, (2, 3)),
        ({1, 3}, 2, (0, 2)),  # whichever set is free
        ({0, 1, 2}, 2, None),  # too few free
        (set(), 4, (0, 1, 2, 3)),
    ],
)
def test_pick_gpus(busy: set[int], count: int, expected: tuple[int, ...] | None) -> None:
    assert pick_gpus(frozenset(busy), 4, count) == expected


# (name, state, jobs, policy overrides, expected phase, expected yield reason or None)
YIELD_TABLE = [
    ("overlap", serving(), [job("7", {3})], {}, Phase.YIELDING, YieldReason.JOB),
    ("no overlap", serving(), [job("7", {0, 1})], {}, Phase.SERVING, None),
    ("cpu-only job", serving(), [job("7", set())], {}, Phase.SERVING, None),
    ("cpu-only job, yield_on_any_job", serving(), [job("7", set())], {"yield_on_any_job": True},
     Phase.YIELDING, YieldReason.ANY_JOB),
    ("slurm timeout: unknown GPUs", serving(), [job("7", None)], {}, Phase.YIELDING, YieldReason.SLURM_UNKNOWN),
    ("claim-all: any GPU job", serving((0, 1, 2, 3)), [job("7", {0})], {"claim_gpus": 4},
     Phase.YIELDING, YieldReason.JOB),
    ("claim-all: index we do not know", serving((0, 1, 2, 3)), [job("7", {9})], {"claim_gpus": 4},
     Phase.YIELDING, YieldReason.JOB),
    ("claim-all: cpu-only job", serving((0, 1, 2, 3)), [job("7", set())], {"claim_gpus": 4},
     Phase.SERVING, None),
    ("prolog request", serving(), [job("7", {2}, source=JobSource.PROLOG)], {}, Phase.YIELDING, YieldReason.PROLOG),
    ("job process on our GPU", serving(), [job("7", {2}, source=JobSource.GPU_PROCESS)], {},
     Phase.YIELDING, YieldReason.GPU_PROCESS),
    ("while starting", replace(serving(), phase=Phase.STARTING), [job("7", {2})], {},
     Phase.YIELDING, YieldReason.JOB),
]


@pytest.mark.parametrize(("name", "state", "jobs", "over", "phase", "reason"), YIELD_TABLE,
                         ids=[row[0] for row in YIELD_TABLE])
def test_yield_table(name: str, state: State, jobs: list[Job], over: dict[str, object], phase: Phase,
                     reason: YieldReason | None) -> None:
    policy = replace(POLICY, **over)  # type: ignore[arg-type]
    new, actions = decide(state, obs(*jobs, server=UP), 10.0, policy)
    assert new.phase == phase
    stops = [a for a in actions if isinstance(a, StopServer)]
    if reason is None:
        assert stops == []
        assert not any(isinstance(a, CountConflict) for a in actions)
    else:
        assert [s.reason for s in stops] == [reason]
        assert stops[0].job_ids == ("7",)
        assert [a.job_id for a in actions if isinstance(a, CountConflict)] == ["7"]
        assert new.last_yield is not None and new.last_yield.reason == reason


def test_yield_latency_clock_starts_at_the_earliest_signal() -> None:
    jobs = [job("8", {3}, seen=9.5), job("7", {2}, seen=9.2)]
    _, actions = decide(serving(), obs(*jobs, server=UP), 10.0, POLICY)
    stop = next(a for a in actions if isinstance(a, StopServer))
    assert stop.signal_at == 9.2
    assert set(stop.job_ids) == {"7", "8"}


def test_conflict_counted_once_per_job() -> None:
    state, actions = decide(serving(), obs(job("7", {3}, source=JobSource.PROLOG), server=UP), 1.0, POLICY)
    assert [a for a in actions if isinstance(a, CountConflict)] == [CountConflict("7")]
    # The same job's cgroup shows up while the stop is under way: no second count, no second yield.
    state, actions = decide(state, obs(job("7", {3}), server=STARTING), 1.1, POLICY)
    assert actions == [StopServer(reason=None)]


def test_full_cycle_claim_yield_cooldown_reclaim() -> None:
    state = State()
    state, actions = decide(state, obs(), 0.0, POLICY)
    assert actions == [StartServer(gpus=(2, 3))] and state.phase == Phase.STARTING
    state, actions = decide(state, obs(server=UP), 1.0, POLICY)
    assert state.phase == Phase.SERVING and actions == []
    state, actions = decide(state, obs(job("1", {2, 3}, seen=4.9), server=UP), 5.0, POLICY)
    assert state.phase == Phase.YIELDING
    # The server is gone: idle, and too few GPUs are free while the job runs (0,1 free but we keep
    # off until the cool-down passes even though 2 are free: a yield just happened).
    state, actions = decide(state, obs(job("1", {2, 3})), 5.1, POLICY)
    assert state.phase == Phase.IDLE and state.claimed == () and actions == []
    state, actions = decide(state, obs(job("1", {2, 3})), 34.0, POLICY)
    assert actions == []  # free since 5.1: 28.9 s < 30 s
    state, actions = decide(state, obs(job("1", {2, 3})), 35.2, POLICY)
    assert actions == [StartServer(gpus=(0, 1))]  # whichever set is free


def test_stays_off_while_too_few_gpus_are_free_and_cooldown_restarts_when_they_free() -> None:
    state = replace(serving(), phase=Phase.YIELDING, cooling=True)
    state, _ = decide(state, obs(job("1", {0, 1, 2})), 0.0, POLICY)
    for t in (10.0, 50.0, 100.0):
        state, actions = decide(state, obs(job("1", {0, 1, 2})), t, POLICY)
        assert actions == [] and state.phase == Phase.IDLE
    state, actions = decide(state, obs(), 101.0, POLICY)  # job ended: the cool-down clock starts now
    assert actions == []
    state, actions = decide(state, obs(), 130.9, POLICY)
    assert actions == []
    state, actions = decide(state, obs(), 131.0, POLICY)
    assert actions == [StartServer(gpus=(2, 3))]


def test_cooldown_clock_resets_when_gpus_get_busy_again() -> None:
    state = State(phase=Phase.IDLE, cooling=True, ever_started=True)
    state, _ = decide(state, obs(), 0.0, POLICY)
    state, _ = decide(state, obs(job("1", {0, 1, 2})), 20.0, POLICY)
    state, actions = decide(state, obs(), 31.0, POLICY)
    assert actions == []  # freed again at 31: needs until 61
    state, actions = decide(state, obs(), 61.0, POLICY)
    assert actions == [StartServer(gpus=(2, 3))]


def test_never_starts_while_a_conflicting_or_unknown_job_runs() -> None:
    for jobs in ([job("1", None)], [job("1", {1, 2, 3})]):
        state, actions = decide(State(), obs(*jobs), 0.0, POLICY)
        assert actions == [] and state.phase == Phase.IDLE


def test_backoff_is_exponential_and_capped() -> None:
    assert [backoff_delay(n, POLICY) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]


def test_crash_backoff_then_restart() -> None:
    state = serving()
    delays = []
    now = 0.0
    for _ in range(4):
        state, actions = decide(state, obs(server=ServerObs(crashed=True, exit_code=1)), now, POLICY)
        assert state.phase == Phase.BACKOFF and actions == []
        delays.append(state.backoff_until - now)
        state, actions = decide(state, obs(), state.backoff_until - 0.01, POLICY)
        assert actions == []
        now = state.backoff_until
        state, actions = decide(state, obs(), now, POLICY)
        assert actions == [StartServer(gpus=(2, 3))]  # no cool-down after a crash
    assert delays == [5, 10, 20, 40]


def test_stable_serving_forgives_crashes() -> None:
    state = replace(serving(), crashes=3)
    state, _ = decide(state, obs(server=UP), 119.0, POLICY)
    assert state.crashes == 3
    state, _ = decide(state, obs(server=UP), 120.0, POLICY)
    assert state.crashes == 0


def test_startup_timeout_counts_as_crash_and_stops_the_server() -> None:
    state = replace(serving(), phase=Phase.STARTING, phase_since=0.0)
    state, actions = decide(state, obs(server=STARTING), 599.0, POLICY)
    assert state.phase == Phase.STARTING and actions == []
    state, actions = decide(state, obs(server=STARTING), 600.0, POLICY)
    assert state.phase == Phase.BACKOFF and actions == [StopServer(reason=None)] and state.crashes == 1


def test_switch_restarts_without_cooldown() -> None:
    state, actions = decide(serving(), obs(server=UP, restart_requested=True), 1.0, POLICY)
    assert actions == [StopServer(reason=None)] and state.phase == Phase.YIELDING
    state, actions = decide(state, obs(), 1.5, POLICY)
    assert actions == [StartServer(gpus=(2, 3))]


def test_unkillable_server_keeps_being_stopped_without_counting_new_yields() -> None:
    state, _ = decide(serving(), obs(job("1", {3}), server=UP), 1.0, POLICY)
    state, actions = decide(state, obs(job("1", {3}), server=UP), 2.0, POLICY)
    assert state.phase == Phase.YIELDING and actions == [StopServer(reason=None)]


def test_disabled_stops_and_never_starts() -> None:
    state, actions = decide(serving(), obs(server=UP, disabled_reason="exporter-only"), 1.0, POLICY)
    assert state.phase == Phase.DISABLED and actions == [StopServer(reason=None)]
    state, actions = decide(state, obs(disabled_reason="exporter-only"), 2.0, POLICY)
    assert actions == []
    state, actions = decide(state, obs(), 3.0, POLICY)
    assert actions == [StartServer(gpus=(2, 3))]


def test_gpu_owners() -> None:
    state = serving()
    owners = gpu_owners(state, obs(job("1", {0}), job("2", {3}), server=UP), POLICY)
    assert owners == {0: Owner.SLURM, 1: Owner.FREE, 2: Owner.WATCHDOG, 3: Owner.SLURM}


def test_a_day_of_random_jobs_never_serves_on_a_job_gpu() -> None:
    import random

    rng = random.Random(7)
    state, jobs, now = State(), {}, 0.0
    server = DOWN
    for step in range(20_000):
        now += rng.uniform(0.5, 8.0)
        for jid in [j for j, (_, end) in jobs.items() if end <= now]:
            del jobs[jid]
        if rng.random() < 0.1:
            gpus = frozenset(rng.sample(range(4), rng.randint(0, 3)))
            jobs[str(step)] = (gpus, now + rng.uniform(1, 600))
        current = tuple(Job(j, g, now) for j, (g, _) in jobs.items())
        state, actions = decide(state, Observation(4, current, server), now, POLICY)
        for action in actions:
            if isinstance(action, StartServer):
                server = ServerObs(running=True, ready=True, pid=1)
            elif isinstance(action, StopServer):
                server = DOWN
        if server.running:
            held = set().union(*(g for g, _ in jobs.values())) if jobs else set()
            assert not held & set(state.claimed), f"serving on a job's GPU at step {step}"


def test_core_imports_no_io() -> None:
    forbidden = {"httpx", "watchdog", "pynvml", "subprocess", "socket", "time", "os", "threading"}
    core = Path(__file__).resolve().parents[2] / "exporter_watchdog" / "core"
    for path in core.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden, f"{path.name} imports {name}"
                assert not name.startswith(("exporter_watchdog.detect", "exporter_watchdog.act",
                                            "exporter_watchdog.metrics", "exporter_watchdog.replay")), \
                    f"{path.name} imports {name}"
