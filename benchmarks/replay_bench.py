"""Replay speed: 1,000,000 jobs on 500 nodes of 8 GPUs through the real decide(); target under 60 s.

Generates a synthetic history (not timed), writes it as `sacct -P` text, then times what
`exporter-watchdog replay` does: read and place the trace, and replay every node in worker processes.
Also prints a sweep over a synthetic month (64 nodes) and writes its SVG when asked (--sweep-svg).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from exporter_watchdog.core.model import Policy, StartRule
from exporter_watchdog.replay.place import place
from exporter_watchdog.replay.report import SWEEP_COLUMNS, summarize, summary_text, sweep_svg, table
from exporter_watchdog.replay.run import Case, World, replay
from exporter_watchdog.replay.simulate import ServerModel
from exporter_watchdog.replay.synth import SynthSpec, generate, sacct_text
from exporter_watchdog.replay.trace import read_trace


def speed(jobs: int, nodes: int, workers: int, cold: float) -> float:
    """Seconds to read, place and replay `jobs` jobs; prints the stages and the totals."""
    spec = SynthSpec(nodes=nodes, gpus_per_node=8, seed=7)
    t = time.perf_counter()
    history = generate(spec, jobs=jobs)
    with tempfile.TemporaryDirectory(prefix="replay-bench-") as tmp:
        path = Path(tmp) / "trace.sacct"
        path.write_text(sacct_text(history, "a100"))
        print(f"generated {len(history):,} jobs on {nodes} nodes x 8 GPUs "
              f"({(history[-1].start - history[0].start) / 86400:.1f} days of arrivals, "
              f"{path.stat().st_size / 2**20:.0f} MiB of sacct text) in {time.perf_counter() - t:.1f} s (not timed)")
        del history
        t0 = time.perf_counter()
        trace = read_trace(path)
    node_gpus = {n: 8 for n in spec.node_names()}
    start = min(j.start for j in trace.jobs)
    end = max(j.start for j in trace.jobs)  # the last arrival: no drain of long jobs after it
    t1 = time.perf_counter()
    placement = place(trace.jobs, node_gpus, unknown_end=end)
    t2 = time.perf_counter()
    case = Case(Policy(claim_gpus=8, cooldown_seconds=60), ServerModel(cold_start=cold, stop=10.0))
    results = replay(World(placement, node_gpus, start, end), [case], workers=workers)[0]
    t3 = time.perf_counter()
    total = t3 - t0
    print(f"read {len(trace.jobs):,} jobs: {t1 - t0:.1f} s; place GPUs: {t2 - t1:.1f} s; "
          f"replay {nodes} nodes with {workers} worker(s): {t3 - t2:.1f} s")
    print(summary_text(summarize(results)))
    print(f"\nTOTAL {total:.1f} s for {len(trace.jobs):,} jobs ({len(trace.jobs) / total:,.0f} jobs/s); "
          f"target < 60 s: {'met' if total < 60 else 'NOT met'}")
    return total


def month_sweep(svg: Path | None, cold: float, workers: int) -> None:
    """A synthetic month on 64 nodes: cool-down x claim x start rule."""
    spec = SynthSpec(nodes=64, days=30, seed=11)
    history = generate(spec)
    node_gpus = {n: 8 for n in spec.node_names()}
    t0, t1 = spec.start, spec.start + spec.days * 86400
    world = World(place(history, node_gpus, unknown_end=t1), node_gpus, t0, t1)
    combos = [{"claim": c, "cooldown": cd, "start_rule": r.value}
              for c in (1, 2, 4, 8) for cd in (0, 60, 300, 900) for r in StartRule]
    cases = [Case(Policy(claim_gpus=k["claim"], cooldown_seconds=k["cooldown"], start_rule=StartRule(k["start_rule"]),
                         cold_start_seconds=cold), ServerModel(cold_start=cold, stop=10.0)) for k in combos]
    t = time.perf_counter()
    results = replay(world, cases, workers=workers)
    rows = [{**k, **summarize(r)} for k, r in zip(combos, results, strict=True)]
    print(f"\nsweep over a synthetic month: {len(history):,} jobs, 64 nodes x 8 GPUs, cold start {cold:g} s, "
          f"stop 10 s ({len(cases)} replays in {time.perf_counter() - t:.1f} s)")
    print(table(rows, SWEEP_COLUMNS))
    if svg is not None:
        svg.write_text(sweep_svg(rows, f"synthetic month, 64 nodes x 8 GPUs, cold start {cold:g} s"))
        print(f"plot: {svg}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cold-start", type=float, default=300.0)
    parser.add_argument("--sweep", action="store_true", help="also run the synthetic-month sweep")
    parser.add_argument("--sweep-svg", type=Path, help="where to write the sweep plot")
    args = parser.parse_args()
    if args.jobs > 0:
        speed(args.jobs, args.nodes, args.workers, args.cold_start)
    if args.sweep or args.sweep_svg:
        month_sweep(args.sweep_svg, args.cold_start, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
