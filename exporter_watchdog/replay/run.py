"""Replay every node of a placed trace under one or more policies, in worker processes when asked."""

from __future__ import annotations

import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from exporter_watchdog.core.model import Policy
from exporter_watchdog.replay.place import Placement
from exporter_watchdog.replay.simulate import NodeResult, ServerModel, simulate_node


@dataclass(frozen=True)
class Case:
    """One policy and server model to replay the whole trace under."""

    policy: Policy
    model: ServerModel


@dataclass(frozen=True)
class World:
    """What every case shares: the nodes, their jobs and the window."""

    placement: Placement
    node_gpus: Mapping[str, int]
    t0: float
    t1: float

    def replay_node(self, case: Case, node: str, record: bool = False) -> NodeResult:
        gpus = self.node_gpus[node]
        policy = case.policy
        return simulate_node(node, gpus, self.placement.jobs(node), policy, case.model, self.t0, self.t1, record)


# Set in each worker by the pool's initializer (inherited through fork, never pickled): the trace is
# large and every task of a run reads the same one.
_WORKER: tuple[World, Sequence[Case]] | None = None


def _init(world: World, cases: Sequence[Case]) -> None:
    global _WORKER
    _WORKER = (world, cases)


def _task(item: tuple[int, Sequence[str]]) -> tuple[int, list[NodeResult]]:
    assert _WORKER is not None
    world, cases = _WORKER
    index, nodes = item
    return index, [world.replay_node(cases[index], node) for node in nodes]


def replay(world: World, cases: Sequence[Case], workers: int = 1) -> list[list[NodeResult]]:
    """Per case, one result per node (in node order). `workers` > 1 forks that many processes."""
    nodes = sorted(world.node_gpus)
    if workers <= 1 or len(nodes) * len(cases) < 8:
        return [[world.replay_node(case, node) for node in nodes] for case in cases]
    # Chunks of nodes per case, several per worker so a slow chunk does not hold the others up.
    size = max(1, len(nodes) // (workers * 4))
    chunks = [nodes[i:i + size] for i in range(0, len(nodes), size)]
    out: list[dict[str, NodeResult]] = [{} for _ in cases]
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_init, initargs=(world, cases)) as pool:
        items = [(i, chunk) for i in range(len(cases)) for chunk in chunks]
        for index, results in pool.map(_task, items):
            for result in results:
                out[index][result.node] = result
    return [[found[node] for node in nodes] for found in out]
