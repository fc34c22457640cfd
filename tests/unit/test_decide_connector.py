"""The tunnel connector's policy in the core: started once the server is ready, stopped first on a yield,
drained before a restart or shutdown, restarted with backoff after it exits; time is an argument."""

from __future__ import annotations

from dataclasses import replace

from exporter_watchdog.core.connector import connector_backoff
from exporter_watchdog.core.decide import decide
from exporter_watchdog.core.model import (
    Action,
    CountConflict,
    Job,
    JobSource,
    Observation,
    Phase,
    Policy,
    ServerObs,
    StartConnector,
    StartServer,
    State,
    StopConnector,
    StopServer,
    TunnelObs,
    YieldReason,
)

POLICY = Policy(claim_gpus=2, cooldown_seconds=30, startup_timeout_seconds=600, backoff_initial_seconds=5,
                backoff_max_seconds=60, stable_after_seconds=120, tunnel_grace_seconds=30,
                connector_backoff_initial_seconds=1, connector_backoff_max_seconds=8)
UP = ServerObs(running=True, ready=True, pid=100)
STARTING = ServerObs(running=True, ready=False, pid=100)
DOWN = ServerObs()
OFF = TunnelObs(enabled=True)
CONNECTING = TunnelObs(enabled=True, running=True, pid=200)
CONNECTED = TunnelObs(enabled=True, running=True, ready=True, pid=200)
DRAINING = TunnelObs(enabled=True, running=True, stopping=True, pid=200)


def obs(*jobs: Job, server: ServerObs = UP, tunnel: TunnelObs = CONNECTED, **kw: object) -> Observation:
    return Observation(node_gpus=4, jobs=tuple(jobs), server=server, tunnel=tunnel, **kw)  # type: ignore[arg-type]


def serving(**kw: object) -> State:
    return replace(State(phase=Phase.SERVING, claimed=(2, 3), phase_since=0.0, ever_started=True), **kw)


def kinds(actions: list[Action]) -> list[type]:
    return [type(a) for a in actions]


def test_connector_starts_only_once_the_server_is_ready() -> None:
    state = State(phase_since=0.0)
    state, actions = decide(state, obs(server=DOWN, tunnel=OFF), 1.0, POLICY)
    assert actions == [StartServer(gpus=(2, 3))]
    state, actions = decide(state, obs(server=STARTING, tunnel=OFF), 2.0, POLICY)
    assert actions == [] and state.phase == Phase.STARTING
    state, actions = decide(state, obs(server=UP, tunnel=OFF), 3.0, POLICY)
    assert state.phase == Phase.SERVING and actions == [StartConnector()]
    assert state.connector_since == 3.0
    # Running: nothing more to do.
    state, actions = decide(state, obs(tunnel=CONNECTING), 4.0, POLICY)
    assert actions == []


def test_serving_but_health_flapping_does_not_start_it() -> None:
    _, actions = decide(serving(), obs(server=STARTING, tunnel=OFF), 5.0, POLICY)
    assert actions == []


def test_disabled_tunnel_never_yields_connector_actions() -> None:
    _, actions = decide(serving(), obs(tunnel=TunnelObs()), 5.0, POLICY)
    assert actions == []


def test_yield_stops_connector_first_and_does_not_wait_for_its_drain() -> None:
    state, actions = decide(serving(), obs(Job("7", frozenset({3}), 4.5, JobSource.CGROUP)), 5.0, POLICY)
    assert kinds(actions) == [CountConflict, StopConnector, StopServer]
    assert actions[1] == StopConnector(drain=False)
    assert actions[2] == StopServer(reason=YieldReason.JOB, job_ids=("7",), signal_at=4.5)
    assert state.phase == Phase.YIELDING and state.drain_until is None
    # Next step: the server is gone, the connector still drains: nothing is waited for or re-sent.
    state, actions = decide(state, obs(Job("7", frozenset({3}), 4.5), server=DOWN, tunnel=DRAINING), 5.1, POLICY)
    assert actions == [] and state.phase == Phase.IDLE


def test_yield_while_connector_already_drains_for_a_switch_stops_the_server_at_once() -> None:
    state, actions = decide(serving(), obs(restart_requested=True), 5.0, POLICY)
    assert actions == [StopConnector(drain=True)] and state.drain_until == 35.0
    state, actions = decide(state, obs(Job("8", frozenset({2}), 6.0), tunnel=DRAINING), 6.0, POLICY)
    assert kinds(actions) == [CountConflict, StopServer] and state.phase == Phase.YIELDING
    assert state.drain_until is None


def test_switch_drains_the_connector_before_the_server_stops() -> None:
    state, actions = decide(serving(), obs(restart_requested=True), 5.0, POLICY)
    assert actions == [StopConnector(drain=True)] and state.phase == Phase.SERVING
    # Still draining: the server keeps serving its in-flight requests (the request flag was one-shot).
    state, actions = decide(state, obs(tunnel=DRAINING), 10.0, POLICY)
    assert actions == [] and state.phase == Phase.SERVING
    # The connector exited: now the server stops, to come back on the new profile.
    state, actions = decide(state, obs(tunnel=OFF), 12.0, POLICY)
    assert actions == [StopServer(reason=None)] and state.phase == Phase.YIELDING
    assert state.drain_until is None and not state.cooling


def test_switch_stops_the_server_at_the_grace_deadline_even_if_the_connector_lingers() -> None:
    state, _ = decide(serving(), obs(restart_requested=True), 5.0, POLICY)
    state, actions = decide(state, obs(tunnel=DRAINING), 34.9, POLICY)
    assert actions == []
    state, actions = decide(state, obs(tunnel=DRAINING), 35.0, POLICY)
    assert actions == [StopServer(reason=None)]


def test_switch_without_a_running_connector_restarts_at_once() -> None:
    state, actions = decide(serving(connector_backoff_until=99.0), obs(tunnel=OFF, restart_requested=True), 5.0,
                            POLICY)
    assert actions == [StopServer(reason=None)]


def test_shutdown_drains_then_stops_and_starts_nothing() -> None:
    state, actions = decide(serving(), obs(shutdown=True), 5.0, POLICY)
    assert actions == [StopConnector(drain=True)]
    state, actions = decide(state, obs(shutdown=True, tunnel=DRAINING), 6.0, POLICY)
    assert actions == []
    state, actions = decide(state, obs(shutdown=True, tunnel=OFF), 7.0, POLICY)
    assert actions == [StopServer(reason=None)]
    state, actions = decide(state, obs(shutdown=True, server=DOWN, tunnel=OFF), 7.1, POLICY)
    assert actions == []
    # Idle with free GPUs: a shutting-down daemon does not start a server.
    _, actions = decide(State(phase_since=0.0), obs(shutdown=True, server=DOWN, tunnel=OFF), 8.0, POLICY)
    assert actions == []


def test_a_job_during_the_shutdown_drain_gets_its_gpus_at_once() -> None:
    state, _ = decide(serving(), obs(shutdown=True), 5.0, POLICY)
    state, actions = decide(state, obs(Job("9", None, 6.0), shutdown=True, tunnel=DRAINING), 6.0, POLICY)
    assert kinds(actions) == [CountConflict, StopServer]
    assert actions[1] == StopServer(reason=YieldReason.SLURM_UNKNOWN, job_ids=("9",), signal_at=6.0)


def test_server_crash_stops_the_connector_but_a_connector_exit_never_stops_the_server() -> None:
    state, actions = decide(serving(), obs(server=ServerObs(crashed=True, exit_code=1)), 5.0, POLICY)
    assert actions == [StopConnector(drain=False)] and state.phase == Phase.BACKOFF

    crashed = TunnelObs(enabled=True, crashed=True)
    state, actions = decide(serving(connector_since=1.0), obs(tunnel=crashed), 5.0, POLICY)
    assert actions == [] and state.phase == Phase.SERVING
    assert state.connector_crashes == 1 and state.connector_backoff_until == 6.0


def test_connector_restarts_with_backoff_while_the_server_serves() -> None:
    crashed = TunnelObs(enabled=True, crashed=True)
    state = serving(connector_since=1.0)
    restarts = []
    now = 5.0
    for _ in range(6):
        state, actions = decide(state, obs(tunnel=crashed), now, POLICY)
        assert actions == []
        wait = state.connector_backoff_until - now
        state, actions = decide(state, obs(tunnel=OFF), now + wait - 0.01, POLICY)
        assert actions == []
        now += wait
        state, actions = decide(state, obs(tunnel=OFF), now, POLICY)
        assert actions == [StartConnector()] and state.phase == Phase.SERVING
        restarts.append(wait)
    assert restarts == [1, 2, 4, 8, 8, 8]
    # Up for stable_after_seconds: the count is forgiven.
    state, _ = decide(state, obs(tunnel=CONNECTED), now + 120, POLICY)
    assert state.connector_crashes == 0


def test_a_connector_whose_leader_died_but_group_lives_is_stopped() -> None:
    leftover = TunnelObs(enabled=True, running=True, crashed=True)
    state, actions = decide(serving(), obs(tunnel=leftover), 5.0, POLICY)
    assert actions == [StopConnector(drain=False)] and state.phase == Phase.SERVING


def test_no_new_connector_while_the_old_one_still_drains() -> None:
    _, actions = decide(serving(), obs(tunnel=DRAINING), 5.0, POLICY)
    assert actions == []


def test_connector_backoff_is_capped() -> None:
    assert [connector_backoff(n, POLICY) for n in range(1, 7)] == [1, 2, 4, 8, 8, 8]
