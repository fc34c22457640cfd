"""Synthetic GPU-cluster histories shaped like published traces: short jobs, heavy tail, a queue.

Philly and Helios report median GPU jobs of a few minutes, a long tail of day-long jobs, most jobs on
one or a few GPUs, some whole-node multi-node jobs, and about a third of GPU-time idle. Jobs arrive
as a Poisson stream sized for a target load and are scheduled first-fit (best-fitting node) with a
small backfill window, as a Slurm cluster would: a waiting job starts when a job ends.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from exporter_watchdog.replay.trace import TraceJob, utc_text

# (weight, median seconds, lognormal sigma): short tests, hour-long runs, day-long training.
DURATIONS = ((0.60, 180.0, 1.2), (0.35, 3600.0, 1.0), (0.05, 43200.0, 0.8))
MAX_SECONDS = 7 * 86400.0
# (weight, GPUs per node, nodes)
SHAPES = ((0.50, 1, 1), (0.20, 2, 1), (0.15, 4, 1), (0.10, 8, 1), (0.03, 8, 2), (0.02, 8, 4))
BACKFILL = 64  # waiting jobs looked at when GPUs free up


@dataclass(frozen=True)
class SynthSpec:
    nodes: int = 64
    gpus_per_node: int = 8
    days: float = 30.0
    load: float = 0.67  # offered GPU-time / capacity
    seed: int = 1
    start: float = 1_790_000_000.0  # a fixed epoch second, so traces are reproducible

    def node_names(self) -> list[str]:
        width = max(3, len(str(self.nodes)))
        return [f"gpu{i:0{width}d}" for i in range(1, self.nodes + 1)]


def _pick(rng: random.Random, table: tuple[tuple[float, ...], ...]) -> tuple[float, ...]:
    x = rng.random() * sum(row[0] for row in table)
    for row in table:
        x -= row[0]
        if x <= 0:
            return row
    return table[-1]


def mean_gpu_seconds(samples: int = 20000, seed: int = 0) -> float:
    """The mean GPU-seconds one job asks for (sampled, to size the arrival rate)."""
    rng = random.Random(seed)
    total = 0.0
    for _ in range(samples):
        _, gpus, nodes = _pick(rng, SHAPES)
        _, median, sigma = _pick(rng, DURATIONS)
        total += gpus * nodes * min(rng.lognormvariate(0.0, sigma) * median, MAX_SECONDS)
    return total / samples


def generate(spec: SynthSpec, jobs: int | None = None) -> list[TraceJob]:
    """A history of `spec.days` (or of `jobs` jobs, the length then following from the load)."""
    rng = random.Random(spec.seed)
    names = spec.node_names()
    capacity = spec.nodes * spec.gpus_per_node
    per_job = mean_gpu_seconds()
    rate = spec.load * capacity / per_job  # arrivals per second
    horizon = spec.start + (jobs / rate if jobs is not None else spec.days * 86400.0)
    # free[f] = nodes with exactly f free GPUs (best fit picks the smallest f that fits)
    free_of = [spec.gpus_per_node] * spec.nodes
    buckets: list[set[int]] = [set() for _ in range(spec.gpus_per_node + 1)]
    buckets[spec.gpus_per_node] = set(range(spec.nodes))
    ends: list[tuple[float, int, tuple[int, ...], int]] = []  # (end, serial, nodes, gpus per node)
    waiting: list[tuple[int, str, int, int, float]] = []  # (serial, id, gpus, nodes, seconds)
    out: list[TraceJob] = []
    serial = 0
    now = spec.start

    def take(node: int, gpus: int) -> None:
        buckets[free_of[node]].discard(node)
        free_of[node] -= gpus
        buckets[free_of[node]].add(node)

    def try_start(job_id: str, gpus: int, nodes: int, seconds: float, at: float) -> bool:
        if nodes == 1:
            for f in range(gpus, spec.gpus_per_node + 1):
                if buckets[f]:
                    chosen: tuple[int, ...] = (min(buckets[f]),)
                    break
            else:
                return False
        else:
            if len(buckets[spec.gpus_per_node]) < nodes:
                return False
            chosen = tuple(sorted(buckets[spec.gpus_per_node])[:nodes])
        for node in chosen:
            take(node, gpus)
        end = at + seconds
        heapq.heappush(ends, (end, len(out), chosen, gpus))
        out.append(TraceJob(job_id, tuple(names[c] for c in chosen), (gpus,) * len(chosen), at, end))
        return True

    while True:
        arrival = now + rng.expovariate(rate)
        if (jobs is not None and serial >= jobs) or (jobs is None and arrival >= horizon):
            arrival = float("inf")
        while ends and ends[0][0] <= arrival:
            end, _, chosen, gpus = heapq.heappop(ends)
            for node in chosen:
                take(node, -gpus)
            kept = []
            for k, item in enumerate(waiting):
                if k >= BACKFILL or not try_start(item[1], item[2], item[3], item[4], end):
                    kept.append(item)
            waiting = kept
        if arrival == float("inf"):
            break
        now = arrival
        serial += 1
        _, want, count = _pick(rng, SHAPES)
        _, median, sigma = _pick(rng, DURATIONS)
        seconds = round(min(rng.lognormvariate(0.0, sigma) * median, MAX_SECONDS), 0) + 1.0
        job_id = str(1000 + serial)
        if waiting or not try_start(job_id, int(want), int(count), seconds, now):
            waiting.append((serial, job_id, int(want), int(count), seconds))
    return out


def sacct_text(jobs: list[TraceJob], gpu_type: str | None = None) -> str:
    """The jobs as `sacct -a -X -P --format=JobID,NodeList,AllocTRES,Start,End,State` prints them."""
    lines = ["JobID|NodeList|AllocTRES|Start|End|State"]
    for job in jobs:
        total = sum(job.gpus)
        tres = f"billing={total},cpu={total * 4},mem={total * 16}G,node={len(job.nodes)}"
        if total:
            tres += f",gres/gpu={total}" if gpu_type is None else f",gres/gpu:{gpu_type}={total},gres/gpu={total}"
        nodelist = job.nodes[0] if len(job.nodes) == 1 else ",".join(job.nodes)
        end = utc_text(job.end) if job.end is not None else "Unknown"
        lines.append(f"{job.job_id}|{nodelist}|{tres}|{utc_text(job.start)}|{end}|COMPLETED")
    return "\n".join(lines) + "\n"
