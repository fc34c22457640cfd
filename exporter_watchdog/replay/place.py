"""Put each job's GPUs on GPU indices: sacct does not record them, so do as Slurm does (lowest free)."""

from __future__ import annotations

import functools
import heapq
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from exporter_watchdog.replay.trace import TraceJob

# One job on one node: (start, end, job id, GPU indices). Plain tuples: a million of them are made.
Placed = tuple[float, float, str, frozenset[int]]


@dataclass
class Placement:
    """Per node, its jobs with GPU indices, by start time; and the jobs that did not fit."""

    nodes: dict[str, list[Placed]] = field(default_factory=dict)
    short: int = 0  # job-nodes given fewer GPUs than they held: the trace overlaps itself on a node

    def jobs(self, node: str) -> list[Placed]:
        return self.nodes.get(node, [])


def place(jobs: Iterable[TraceJob], node_gpus: Mapping[str, int], unknown_end: float) -> Placement:
    """Lowest free indices at each job's start, ends before starts at equal times (Slurm's order)."""
    wanted: dict[str, list[tuple[float, float, str, int]]] = {}
    for job in jobs:
        end = job.end if job.end is not None else unknown_end
        if end <= job.start:
            continue
        for node, count in zip(job.nodes, job.gpus, strict=True):
            wanted.setdefault(node, []).append((job.start, end, job.job_id, count))
    out = Placement()
    for node, items in wanted.items():
        items.sort()
        total = node_gpus[node]
        everything = (1 << total) - 1
        used = 0
        running: list[tuple[float, int]] = []  # (end, mask) of jobs holding GPUs
        placed: list[Placed] = []
        for start, end, job_id, count in items:
            while running and running[0][0] <= start:
                used &= ~heapq.heappop(running)[1]
            mask = 0
            if count:
                free = everything & ~used
                taken = 0
                for g in range(total):
                    if taken == count:
                        break
                    if free >> g & 1:
                        mask |= 1 << g
                        taken += 1
                if taken < count:
                    out.short += 1
                used |= mask
                heapq.heappush(running, (end, mask))
            placed.append((start, end, job_id, _indices(mask)))
        out.nodes[node] = placed
    return out


@functools.lru_cache(maxsize=65536)
def _indices(mask: int) -> frozenset[int]:
    """The GPU indices of a bit mask (cached: a node has few distinct ones)."""
    return frozenset(g for g in range(mask.bit_length()) if mask >> g & 1)
