"""The tunnel connector's policy: it runs only while the server serves, and never holds up a yield.

Pure like the rest of the core: `with_connector` wraps one step of the server's policy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from exporter_watchdog.core.model import (
    Action,
    Observation,
    Phase,
    Policy,
    StartConnector,
    State,
    StopConnector,
    StopServer,
)

ServerStep = Callable[[State, Observation, float, Policy], tuple[State, list[Action]]]
_UP = (Phase.STARTING, Phase.SERVING)


def connector_backoff(crashes: int, policy: Policy) -> float:
    """Exponential backoff after the n-th consecutive connector exit, capped."""
    exponent = max(crashes - 1, 0)
    delay = policy.connector_backoff_initial_seconds * (2 ** min(exponent, 30))
    return float(min(delay, policy.connector_backoff_max_seconds))


def with_connector(
    state: State, obs: Observation, now: float, policy: Policy, server_step: ServerStep
) -> tuple[State, list[Action]]:
    """One step of the server's policy plus the connector's start, stop and drain."""
    tunnel = obs.tunnel
    live = tunnel.running and not tunnel.stopping
    # A restart with no job waiting (switch, reload) or the daemon's shutdown: the connector drains
    # first (the edge stops sending new requests, in-flight ones finish), then the server stops.
    restart = obs.restart_requested or obs.shutdown or state.drain_until is not None
    hold = False
    if restart and state.phase in _UP:
        if state.drain_until is None and live:
            state = replace(state, drain_until=now + policy.tunnel_grace_seconds)
            hold = True
        elif state.drain_until is not None and tunnel.running and now < state.drain_until:
            hold = True

    if obs.shutdown and state.phase not in _UP:
        # Shutting down with no server to wind down: never start anything again.
        actions: list[Action] = [StopServer(reason=None)] if obs.server.running else []
        if actions:
            state = replace(state, phase=Phase.YIELDING, phase_since=now)
    else:
        state, actions = server_step(state, replace(obs, restart_requested=restart and not hold), now, policy)
    if state.phase not in _UP and state.drain_until is not None:
        state = replace(state, drain_until=None)  # the restart, a yield or a crash went ahead
    return _connector_actions(state, obs, now, policy, actions)


def _connector_actions(
    state: State, obs: Observation, now: float, policy: Policy, actions: list[Action]
) -> tuple[State, list[Action]]:
    tunnel = obs.tunnel
    out = list(actions)
    if tunnel.crashed:
        crashes = state.connector_crashes + 1
        state = replace(state, connector_crashes=crashes, connector_since=None,
                        connector_backoff_until=now + connector_backoff(crashes, policy))
    elif (tunnel.running and state.connector_crashes and state.connector_since is not None
          and now - state.connector_since >= policy.stable_after_seconds):
        state = replace(state, connector_crashes=0)  # up long enough: earlier exits are forgiven

    stop_at = next((i for i, a in enumerate(out) if isinstance(a, StopServer)), None)
    serving = state.phase == Phase.SERVING and state.drain_until is None and not obs.shutdown
    if tunnel.running and not tunnel.stopping and (not serving or stop_at is not None or tunnel.crashed):
        # Before the server's stop, so the edge stops routing to this node first; executing it only
        # sends SIGTERM, so a yield never waits for the drain.
        out.insert(len(out) if stop_at is None else stop_at, StopConnector(drain=state.drain_until is not None))
        state = replace(state, connector_since=None)
    elif (serving and obs.server.ready and not tunnel.running and stop_at is None
          and now >= state.connector_backoff_until):
        out.append(StartConnector())
        state = replace(state, connector_since=now)
    return state, out
