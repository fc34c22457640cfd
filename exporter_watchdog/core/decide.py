"""The decision core: decide(state, observation, now, policy) -> (state, actions). Pure: no I/O, no clock."""

from __future__ import annotations

from collections.abc import Iterable
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
    live_ids = frozenset(j.job_id for j in obs.jobs)
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
                return replace(state, phase=Phase.SERVING, phase_since=now), actions
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
        return replace(state, free_since=None), actions
    free_since = state.free_since if state.free_since is not None else now
    if state.cooling and now - free_since < policy.cooldown_seconds:
        return replace(state, free_since=free_since), actions
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
        state, phase=Phase.YIELDING, phase_since=now, last_yield=record, cooling=True,
        conflicted_jobs=state.conflicted_jobs | frozenset(new),
    ), actions


def _crashed(state: State, now: float, policy: Policy, stop: bool) -> tuple[State, list[Action]]:
    crashes = state.crashes + 1
    state = replace(
        state, phase=Phase.BACKOFF, phase_since=now, claimed=(), crashes=crashes,
        backoff_until=now + backoff_delay(crashes, policy), free_since=None,
    )
    return state, ([StopServer(reason=None)] if stop else [])
