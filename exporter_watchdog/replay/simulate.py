"""One node's jobs fed to the real `decide()` on a simulated clock, with a simple server model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from exporter_watchdog.core.decide import claim_size, decide, job_holds, next_wake
from exporter_watchdog.core.model import (
    CountConflict,
    Job,
    Observation,
    Phase,
    Policy,
    ServerObs,
    StartServer,
    State,
    StopServer,
)
from exporter_watchdog.replay.place import Placed

INF = math.inf


@dataclass(frozen=True)
class ServerModel:
    """How the simulated server and detection behave."""

    cold_start: float  # seconds from StartServer to the first healthy probe
    stop: float = 0.0  # seconds from StopServer until its processes are gone
    detect_delay: float = 0.0  # seconds from a job's start (end) until the daemon sees it (it gone)


@dataclass
class NodeResult:
    """What one node would have seen; GPU-seconds unless named otherwise."""

    node: str
    gpus: int
    seconds: float
    idle: float = 0.0  # GPU-seconds no job held
    clairvoyant: float = 0.0  # what a policy knowing the future could harvest with the same claim
    harvested: float = 0.0  # claimed GPUs x time the server was ready and no job held them
    starts: int = 0
    yields: int = 0
    wasted: int = 0  # starts yielded before the server was ready
    wasted_gpu_seconds: float = 0.0  # claimed GPUs x time spent loading for those
    conflicts: int = 0  # jobs that landed on GPUs the server held
    timeouts: int = 0  # starts stopped by the start-up timeout (cold start >= timeout)
    harvest_log: list[tuple[tuple[int, ...], float, float]] | None = field(default=None, repr=False)


def idle_and_clairvoyant(
    jobs: Sequence[Placed], node_gpus: int, policy: Policy, cold_start: float, t0: float, t1: float,
) -> tuple[float, float]:
    """GPU-seconds no job held, and the clairvoyant bound: in each stretch with at least `claim` GPUs
    free (as the core counts them) lasting L > cold_start, claim x (L - cold_start)."""
    claim = claim_size(policy, node_gpus)
    events: list[tuple[float, int, frozenset[int], frozenset[int]]] = []
    for start, end, job_id, gpus in jobs:
        a, b = max(start, t0), min(end, t1)
        if b <= a:
            continue
        holds = job_holds(Job(job_id, gpus, a), node_gpus, policy)
        events.append((a, 1, gpus, holds))
        events.append((b, -1, gpus, holds))
    events.sort(key=lambda e: (e[0], e[1]))  # ends first at equal times
    true_count = [0] * node_gpus
    core_count = [0] * node_gpus
    busy_true = busy_core = 0
    idle = bound = 0.0
    last = t0
    stretch: float | None = t0 if claim > 0 else None
    for at, sign, gpus, holds in events:
        idle += (node_gpus - busy_true) * (at - last)
        last = at
        for g in gpus:
            true_count[g] += sign
            if true_count[g] == (1 if sign > 0 else 0):
                busy_true += sign
        for g in holds:
            core_count[g] += sign
            if core_count[g] == (1 if sign > 0 else 0):
                busy_core += sign
        enough = claim > 0 and node_gpus - busy_core >= claim
        if enough and stretch is None:
            stretch = at
        elif not enough and stretch is not None:
            bound += claim * max(0.0, at - stretch - cold_start)
            stretch = None
    idle += (node_gpus - busy_true) * (t1 - last)
    if stretch is not None:
        bound += claim * max(0.0, t1 - stretch - cold_start)
    return idle, bound


def simulate_node(
    node: str, node_gpus: int, jobs: Sequence[Placed], policy: Policy, model: ServerModel,
    t0: float, t1: float, record: bool = False,
) -> NodeResult:
    """Drive decide() through the node's jobs from t0 to t1; count what the server harvested."""
    result = NodeResult(node, node_gpus, t1 - t0, harvest_log=[] if record else None)
    result.idle, result.clairvoyant = idle_and_clairvoyant(jobs, node_gpus, policy, model.cold_start, t0, t1)
    delay = model.detect_delay
    # What detection sees: each job from start + delay until end + delay; gone before new at one time.
    seen: list[tuple[float, int, str, frozenset[int]]] = []
    for start, end, job_id, gpus in jobs:
        if end + delay <= t0 or start >= t1:
            continue
        seen.append((max(start + delay, t0), 1, job_id, gpus))
        if end + delay < t1:
            seen.append((end + delay, 0, job_id, gpus))
    seen.sort(key=lambda e: (e[0], e[1]))
    live: dict[str, Job] = {}
    state = State(phase_since=t0)
    running = ready = False
    ready_at = stop_at = INF
    started_at = ready_since = 0.0
    claimed_gpus: tuple[int, ...] = ()
    i, n = 0, len(seen)
    now = t0
    while True:
        while i < n and seen[i][0] <= now:
            at, kind, job_id, gpus = seen[i]
            if kind:
                live[job_id] = Job(job_id, gpus, at)
            else:
                live.pop(job_id, None)
            i += 1
        if ready_at <= now:
            ready, ready_at = True, INF
        if stop_at <= now:
            running, stop_at = False, INF
        before = state.phase
        obs = Observation(node_gpus, tuple(live.values()), ServerObs(running=running, ready=ready))
        state, actions = decide(state, obs, now, policy)
        if before == Phase.STARTING and state.phase == Phase.SERVING:
            ready_since = now
        for action in actions:
            if isinstance(action, StartServer):
                running, ready = True, False
                ready_at, started_at, claimed_gpus = now + model.cold_start, now, action.gpus
                result.starts += 1
            elif isinstance(action, StopServer):
                if stop_at < INF or not running:
                    continue  # already stopping: the core repeats the ask, not a new stop
                ready, ready_at, stop_at = False, INF, now + model.stop
                if before == Phase.SERVING:
                    # Harvest ended when the first job took the GPUs, not when we saw it.
                    ended = now if action.signal_at is None else min(now, action.signal_at - delay)
                    _harvest(result, claimed_gpus, ready_since, max(ready_since, ended))
                if action.reason is not None:
                    result.yields += 1
                    if before == Phase.STARTING:
                        result.wasted += 1
                        result.wasted_gpu_seconds += len(claimed_gpus) * (now - started_at)
                elif before == Phase.STARTING:
                    result.timeouts += 1
            elif isinstance(action, CountConflict):
                result.conflicts += 1
        wake = next_wake(state, policy)
        upcoming = min(seen[i][0] if i < n else INF, ready_at, stop_at,
                       wake if wake is not None and wake > now else INF)
        if upcoming >= t1:
            break
        now = upcoming
    if state.phase == Phase.SERVING:
        _harvest(result, claimed_gpus, ready_since, t1)
    return result


def _harvest(result: NodeResult, gpus: tuple[int, ...], start: float, end: float) -> None:
    result.harvested += len(gpus) * (end - start)
    if result.harvest_log is not None and end > start:
        result.harvest_log.append((gpus, start, end))
