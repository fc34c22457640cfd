"""The decision core: decide(state, observation, now, policy) -> (state, actions). Pure: no I/O, no clock."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import replace

from exporter_watchdog.core.connector import with_connector
from exporter_watchdog.core.model import (
    Action,
    CountConflict,
    Job,
    JobSource,
    Observation,
    Owner,
    Phase,
    Policy,
    StartRule,
    StartServer,
    State,
    StopServer,
    YieldReason,
    YieldRecord,
)


def claim_size(policy: Policy, node_gpus: int) -> int:
    """How many GPUs we claim on this node (never more than it has)."""
    return max(0, min(policy.claim_gpus, node_gpus))


def job_holds(job: Job, node_gpus: int, policy: Policy) -> frozenset[int]:
    """The GPUs a job keeps us off: unknown GPUs count as all of them (fail safe)."""
    everything = frozenset(range(node_gpus))
    if job.gpus is None:
        return everything
    if not job.gpus and policy.yield_on_any_job:
        return everything
    return job.gpus


def busy_gpus(jobs: Iterable[Job], node_gpus: int, policy: Policy) -> frozenset[int]:
    held: set[int] = set()
    for job in jobs:
        held |= job_holds(job, node_gpus, policy)
    return frozenset(held)


def pick_gpus(busy: frozenset[int], node_gpus: int, count: int) -> tuple[int, ...] | None:
    """The `count` highest free indices (Slurm hands out low ones first), or None if too few are free."""
    free = [g for g in range(node_gpus - 1, -1, -1) if g not in busy]
    if count <= 0 or len(free) < count:
        return None
    return tuple(sorted(free[:count]))


def conflicts(jobs: Iterable[Job], claimed: tuple[int, ...], node_gpus: int, policy: Policy) -> list[Job]:
    """Jobs that need (or might need) a GPU we hold."""
    mine = frozenset(claimed)
    claim_all = len(mine) >= node_gpus
    out = []
    for job in jobs:
        held = job_holds(job, node_gpus, policy)
        # Claiming every GPU, any GPU job is ours to yield to, even on an index we do not know.
        if held & mine or (claim_all and job.gpus):
            out.append(job)
    return out


def _yield_reason(job: Job, policy: Policy) -> YieldReason:
    if job.source == JobSource.PROLOG:
        return YieldReason.PROLOG
    if job.source == JobSource.GPU_PROCESS:
        return YieldReason.GPU_PROCESS
    if job.gpus is None:
        return YieldReason.SLURM_UNKNOWN
    if not job.gpus and policy.yield_on_any_job:
        return YieldReason.ANY_JOB
    return YieldReason.JOB


def backoff_delay(crashes: int, policy: Policy) -> float:
    """Exponential backoff after the n-th consecutive crash, capped."""
    exponent = max(crashes - 1, 0)
    return float(min(policy.backoff_initial_seconds * (2 ** min(exponent, 30)), policy.backoff_max_seconds))


def gpu_owners(state: State, obs: Observation, policy: Policy) -> dict[int, Owner]:
    """Who holds each GPU: a job's claim wins over ours (it is about to be handed over)."""
    owners = {g: Owner.FREE for g in range(obs.node_gpus)}
    if obs.server.running or state.phase in (Phase.STARTING, Phase.SERVING, Phase.YIELDING):
        for g in state.claimed:
            if g in owners:
                owners[g] = Owner.WATCHDOG
    for job in obs.jobs:
        for g in job.gpus if job.gpus is not None else ():
            if g in owners:
                owners[g] = Owner.SLURM
    return owners


def decide(state: State, obs: Observation, now: float, policy: Policy) -> tuple[State, list[Action]]:
    """One step of the policy: what to do about what we just saw."""
    if obs.tunnel.enabled or obs.shutdown:
        return with_connector(state, obs, now, policy, _decide_server)
    return _decide_server(state, obs, now, policy)


def _decide_server(state: State, obs: Observation, now: float, policy: Policy) -> tuple[State, list[Action]]:
    """The server's policy; the tunnel connector's is wrapped around it (core/connector.py)."""
    if state.conflicted_jobs:  # forget jobs that are gone (skipped when none: decide runs often in a replay)
        live_ids = frozenset(j.job_id for j in obs.jobs)
        if not state.conflicted_jobs <= live_ids:
            state = replace(state, conflicted_jobs=state.conflicted_jobs & live_ids)
    actions: list[Action] = []

    if obs.disabled_reason is not None:
        # Never serve; stop what runs (no yield: nobody claimed the GPUs).
        if obs.server.running:
            actions.append(StopServer(reason=None))
        if state.phase != Phase.DISABLED:
            state = replace(state, phase=Phase.DISABLED, phase_since=now, claimed=())
        return state, actions
    if state.phase == Phase.DISABLED:
        state = replace(state, phase=Phase.IDLE, phase_since=now, free_since=None)

    if state.phase in (Phase.STARTING, Phase.SERVING):
        hit = conflicts(obs.jobs, state.claimed, obs.node_gpus, policy)
        if hit:
            return _yield(state, hit, now, policy)
        if obs.server.crashed or not obs.server.running:
            return _crashed(state, now, policy, stop=obs.server.running)
        if obs.restart_requested:
            # `switch`: come back on the new profile as soon as the server is down, no cool-down.
            return replace(state, phase=Phase.YIELDING, phase_since=now, cooling=False), [StopServer(reason=None)]
        if state.phase == Phase.STARTING:
            if obs.server.ready:
                return replace(state, phase=Phase.SERVING, phase_since=now,
                               cold_start_seen=now - state.phase_since), actions
            if now - state.phase_since >= policy.startup_timeout_seconds:
                return _crashed(state, now, policy, stop=True)
            return state, actions
        if state.crashes and now - state.phase_since >= policy.stable_after_seconds:
            state = replace(state, crashes=0)
        return state, actions

    if state.phase == Phase.YIELDING:
        if obs.server.running:
            # The stop did not finish (an unkillable child): keep at it; not a new yield.
            return state, [StopServer(reason=None)]
        state = replace(state, phase=Phase.IDLE, phase_since=now, claimed=(), free_since=None)

    if state.phase == Phase.BACKOFF:
        if now < state.backoff_until:
            return state, actions
        state = replace(state, phase=Phase.IDLE, phase_since=now)

    # IDLE: start when enough GPUs are free (and have stayed free for the cool-down after a yield).
    if obs.server.running:
        # A server we did not start through this state (should not happen): do not share GPUs blindly.
        return state, [StopServer(reason=None)]
    count = claim_size(policy, obs.node_gpus)
    pick = pick_gpus(busy_gpus(obs.jobs, obs.node_gpus, policy), obs.node_gpus, count)
    if pick is None:
        if state.free_since is None and state.gap_since is None:
            return state, actions
        return _gap_ended(replace(state, free_since=None), now, policy), actions
    free_since = state.free_since if state.free_since is not None else now
    if state.free_since is None or state.gap_since is None:
        state = replace(state, free_since=free_since, gap_since=now if state.gap_since is None else state.gap_since)
    if state.cooling and now - free_since < policy.cooldown_seconds:
        return state, actions
    if _start_wait(state, policy) > now:
        return state, actions
    state = replace(
        state, phase=Phase.STARTING, phase_since=now, claimed=pick, free_since=None,
        ever_started=True, cooling=False,
    )
    return state, [StartServer(gpus=pick)]


def _yield(state: State, hit: list[Job], now: float, policy: Policy) -> tuple[State, list[Action]]:
    first = min(hit, key=lambda j: j.seen_at)
    reason = _yield_reason(first, policy)
    new = [j.job_id for j in hit if j.job_id not in state.conflicted_jobs]
    actions: list[Action] = [CountConflict(job_id=j) for j in dict.fromkeys(new)]
    job_ids = tuple(dict.fromkeys(j.job_id for j in hit))
    actions.append(StopServer(reason=reason, job_ids=job_ids, signal_at=first.seen_at))
    record = YieldRecord(at=now, reason=reason, job_ids=job_ids, gpus=state.claimed)
    return replace(
        _gap_ended(state, now, policy), phase=Phase.YIELDING, phase_since=now, last_yield=record, cooling=True,
        conflicted_jobs=state.conflicted_jobs | frozenset(new),
    ), actions


def _crashed(state: State, now: float, policy: Policy, stop: bool) -> tuple[State, list[Action]]:
    crashes = state.crashes + 1
    state = replace(
        state, phase=Phase.BACKOFF, phase_since=now, claimed=(), crashes=crashes,
        backoff_until=now + backoff_delay(crashes, policy), free_since=None,
    )
    return state, ([StopServer(reason=None)] if stop else [])


# --- the learned start rule --------------------------------------------------------------------------


def learned_delay(gaps: Sequence[float], cold_start: float, min_gaps: int = 5) -> float:
    """How long a gap must already have lasted before a start pays off, judged by recent gaps.

    The smallest wait d (0 or one of the gaps) such that, of the recent gaps longer than d, at least
    half outlast d + cold_start; with none such, the longest recent gap. Free gaps on a busy node are
    heavy-tailed, so a gap that has lasted a while tends to last a while more. 0 with too few gaps.
    """
    if cold_start <= 0 or len(gaps) < min_gaps:
        return 0.0
    ordered = sorted(gaps)
    n = len(ordered)
    for d in (0.0, *ordered):
        first = bisect_right(ordered, d)  # gaps longer than d are ordered[first:]
        if first >= n:
            break
        if ordered[first + (n - first) // 2] - d >= cold_start:
            return d
    return ordered[-1]


def _cold_start(state: State, policy: Policy) -> float:
    return state.cold_start_seen if state.cold_start_seen is not None else policy.cold_start_seconds


def _start_wait(state: State, policy: Policy) -> float:
    """The earliest time the start rule lets an IDLE node with free GPUs start (-inf: any time)."""
    if policy.start_rule != StartRule.LEARNED or state.gap_since is None:
        return float("-inf")
    return state.gap_since + learned_delay(state.recent_gaps, _cold_start(state, policy))


def _gap_ended(state: State, now: float, policy: Policy) -> State:
    """A job took the free GPUs: remember how long the gap lasted."""
    if state.gap_since is None:
        return state
    gaps = (*state.recent_gaps, now - state.gap_since)[-max(policy.learn_gaps, 1):]
    return replace(state, gap_since=None, recent_gaps=gaps)


def next_wake(state: State, policy: Policy) -> float | None:
    """When decide()'s answer can next change with nothing new observed (a timer), or None.

    The daemon rescans anyway; a replay on a simulated clock asks this instead of ticking.
    """
    if state.phase == Phase.STARTING:
        return state.phase_since + policy.startup_timeout_seconds
    if state.phase == Phase.BACKOFF:
        return state.backoff_until
    if state.phase == Phase.SERVING and state.crashes:
        return state.phase_since + policy.stable_after_seconds
    if state.phase == Phase.IDLE and state.free_since is not None:
        wake = _start_wait(state, policy)
        if state.cooling:
            wake = max(wake, state.free_since + policy.cooldown_seconds)
        return wake if wake != float("-inf") else None
    return None
