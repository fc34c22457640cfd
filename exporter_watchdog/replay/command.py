"""`exporter-watchdog replay TRACE`: what the daemon would have harvested on a cluster's own history."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from exporter_watchdog.config import Config, default_config_path, load_config
from exporter_watchdog.core.model import Policy, StartRule
from exporter_watchdog.replay.place import place
from exporter_watchdog.replay.report import (
    NODE_COLUMNS,
    SWEEP_COLUMNS,
    node_row,
    summarize,
    summary_text,
    sweep_svg,
    table,
)
from exporter_watchdog.replay.run import Case, World, replay
from exporter_watchdog.replay.simulate import ServerModel
from exporter_watchdog.replay.trace import TraceError, parse_time, read_sinfo, read_trace, utc_text

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
SWEEP_KEYS = {"cooldown": float, "claim": int, "start_rule": str, "cold_start": float, "stop": float}
SACCT_COMMAND = ("TZ=UTC sacct -a -X -P -S 2026-10-01 -E 2026-11-01 "
                 "--format=JobID,NodeList,AllocTRES,Start,End,State > trace.sacct")


class UsageError(Exception):
    """Bad arguments or input: exit 2 with this message."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `replay` subcommand."""
    p = subparsers.add_parser(
        "replay", help="predict what the daemon would harvest on a cluster's own job history",
        description="Replay a job history through the daemon's own decision core on a simulated clock, node by\n"
                    "node, and report idle, harvested and clairvoyant GPU-hours, starts, yields and wasted starts.\n\n"
                    f"The history:  {SACCT_COMMAND}\n"
                    "The nodes:    sinfo -N -h -o '%N %G' > nodes.txt\n"
                    "Slurm accounts GPUs only with AccountingStorageTRES=gres/gpu. See docs/replay.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", metavar="TRACE", help="`sacct -P` output or a CSV (job_id,nodes,gpus,start,end)")
    p.add_argument("--config", "-c", metavar="PATH", help="the daemon's config: policy and cold start defaults")
    p.add_argument("--format", choices=("auto", "sacct", "csv"), default="auto", help="trace format (default auto)")
    nodes = p.add_mutually_exclusive_group()
    nodes.add_argument("--sinfo", metavar="FILE", help="nodes and GPUs from `sinfo -N -h -o '%%N %%G'`")
    nodes.add_argument("--gpus-per-node", type=int, metavar="N", help="every node in the trace has N GPUs")
    p.add_argument("--cold-start", type=float, metavar="S",
                   help="seconds from start to ready (default: server.cold_start_seconds, else the daemon's "
                        "last measurement for the active profile, else the profile's cold_start_seconds)")
    p.add_argument("--stop", type=float, default=10.0, metavar="S", help="seconds a stop takes (default 10)")
    p.add_argument("--detect-delay", type=float, default=0.0, metavar="S",
                   help="seconds from a job's start to the daemon seeing it (default 0; measured: tens of ms)")
    p.add_argument("--claim", type=int, metavar="N", help="GPUs claimed (default: claim.gpus, else all)")
    p.add_argument("--cooldown", type=float, metavar="S", help="cool-down after a yield (default: the config's)")
    p.add_argument("--start-rule", choices=[r.value for r in StartRule], help="default: claim.start_rule")
    p.add_argument("--start", metavar="TIME", help="window start, e.g. 2026-10-01T00:00:00 (default: first job)")
    p.add_argument("--end", metavar="TIME", help="window end (default: last job end; running jobs end there)")
    p.add_argument("--sweep", nargs="+", metavar="KEY=V,V",
                   help="replay every combination, e.g. cooldown=0,60,300,900 claim=1,2,4 "
                        f"(keys: {', '.join(SWEEP_KEYS)})")
    p.add_argument("--svg", metavar="PATH", default="replay-sweep.svg", help="the sweep plot (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.add_argument("--per-node", type=int, default=20, metavar="N", help="rows of the per-node table (0: all)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes (default: one per CPU)")
    p.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    try:
        return _replay(args)
    except (UsageError, TraceError) as exc:
        print(f"exporter-watchdog replay: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _config(args: argparse.Namespace) -> Config:
    path = Path(args.config) if args.config else default_config_path()
    return load_config(path)


def _cold_start(args: argparse.Namespace, config: Config) -> float:
    if args.cold_start is not None:
        return float(args.cold_start)
    if config.server.cold_start_seconds is not None:
        return config.server.cold_start_seconds
    from exporter_watchdog.act.statefile import active_profile, measured_cold_start
    from exporter_watchdog.profiles import ProfileError, find_profile, models_dir

    name = active_profile(config.state_dir, config.server.profile)
    if name:
        measured = measured_cold_start(config.state_dir, name)
        if measured is not None:
            return measured
        try:
            profile = find_profile(models_dir(config), name)
        except ProfileError as exc:
            raise UsageError(f"--cold-start not given and the profile cannot be read: {exc}") from None
        if profile.cold_start_seconds is not None:
            return profile.cold_start_seconds
    raise UsageError("no cold start known: pass --cold-start SECONDS, or set server.cold_start_seconds in "
                     f"{config.source} or cold_start_seconds in the profile (or let the daemon measure one)")


def _time(text: str | None, flag: str) -> float | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected a time like 2026-10-01T00:00:00 or epoch seconds") from None


def _sweep(items: list[str]) -> list[dict[str, Any]]:
    axes: list[list[tuple[str, Any]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in SWEEP_KEYS or not values:
            raise UsageError(f"--sweep {item!r}: expected KEY=V1,V2 with KEY one of {', '.join(SWEEP_KEYS)}")
        axis = []
        for value in values.split(","):
            try:
                parsed = SWEEP_KEYS[key](value.strip())
            except ValueError:
                raise UsageError(f"--sweep {item!r}: {value!r} is not a valid {key}") from None
            if key == "start_rule" and parsed not in {r.value for r in StartRule}:
                raise UsageError(f"--sweep {item!r}: start_rule must be always or learned")
            if key != "start_rule" and parsed < (1 if key == "claim" else 0):
                raise UsageError(f"--sweep {item!r}: {value!r} is out of range")
            axis.append((key, parsed))
        axes.append(axis)
    return [dict(combo) for combo in itertools.product(*axes)]


def _replay(args: argparse.Namespace) -> int:
    config = _config(args)
    for flag in ("stop", "detect_delay", "cold_start", "cooldown"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')} {value:g}: must be >= 0")
    if args.claim is not None and args.claim < 1 or args.gpus_per_node is not None and args.gpus_per_node < 1:
        raise UsageError("--claim and --gpus-per-node must be >= 1")
    cold = _cold_start(args, config)
    clock = time.monotonic()
    trace = read_trace(Path(args.trace), args.format)
    if not trace.jobs:
        raise UsageError(f"{args.trace}: no job ran in this trace (skipped: {trace.skipped or 'none'})")
    if not any(any(job.gpus) for job in trace.jobs):
        raise UsageError(f"{args.trace}: no job holds a GPU (AllocTRES has no gres/gpu: Slurm accounts GPUs only "
                         "with AccountingStorageTRES=gres/gpu in slurm.conf)")
    if args.sinfo:
        node_gpus = read_sinfo(Path(args.sinfo))
        unknown = sorted({n for job in trace.jobs for n in job.nodes} - set(node_gpus))
        if unknown:
            raise UsageError(f"{args.sinfo}: the trace has nodes the sinfo dump lacks: {', '.join(unknown[:5])}")
    elif args.gpus_per_node:
        node_gpus = {n: args.gpus_per_node for job in trace.jobs for n in job.nodes}
    else:
        raise UsageError("give the nodes' GPUs: --sinfo FILE (sinfo -N -h -o '%N %G') or --gpus-per-node N")
    t0 = _time(args.start, "--start") or min(job.start for job in trace.jobs)
    t1 = _time(args.end, "--end") or max(job.end if job.end is not None else job.start for job in trace.jobs)
    if t1 <= t0:
        raise UsageError(f"the window {utc_text(t0)} .. {utc_text(t1)} is empty")
    placement = place(trace.jobs, node_gpus, unknown_end=t1)
    world = World(placement, node_gpus, t0, t1)
    parsed = time.monotonic() - clock

    base_claim = args.claim or config.claim.gpus
    base = {
        "claim": base_claim if base_claim is not None else "all",
        "cooldown": args.cooldown if args.cooldown is not None else config.claim.cooldown_seconds,
        "start_rule": args.start_rule or config.claim.start_rule,
        "cold_start": cold, "stop": args.stop,
    }
    combos = [{**base, **combo} for combo in _sweep(args.sweep)] if args.sweep else [base]
    max_gpus = max(node_gpus.values())
    cases = [_case(combo, config, args.detect_delay, max_gpus) for combo in combos]
    clock = time.monotonic()
    results = replay(world, cases, workers=args.workers)
    simulated = time.monotonic() - clock

    doc: dict[str, Any] = {
        "trace": str(args.trace), "jobs": len(trace.jobs), "skipped": trace.skipped,
        "jobs_short_of_gpus": placement.short,
        "window": {"start": utc_text(t0), "end": utc_text(t1), "days": round((t1 - t0) / 86400, 3)},
        "gpu_placement": "lowest free indices at each job's start (sacct does not record GPU indices)",
        "detect_delay_seconds": args.detect_delay,
        "seconds": {"read": round(parsed, 3), "replay": round(simulated, 3)},
    }
    if args.sweep:
        rows = [{**combo, **summarize(res)} for combo, res in zip(combos, results, strict=True)]
        doc["sweep"] = rows
        svg = Path(args.svg)
        svg.parent.mkdir(parents=True, exist_ok=True)
        svg.write_text(sweep_svg(rows, f"replay of {Path(args.trace).name}: {len(trace.jobs):,} jobs, "
                                       f"{len(node_gpus)} nodes, cold start {cold:g} s"), encoding="utf-8")
        doc["svg"] = str(svg)
    else:
        doc["settings"] = base
        doc["summary"] = summarize(results[0])
        doc["nodes"] = [node_row(r) for r in results[0]]
    if args.json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(_header(doc, len(node_gpus)))
    if args.sweep:
        print(table(doc["sweep"], SWEEP_COLUMNS))
        print(f"\nplot: {doc['svg']}")
    else:
        s = base
        print(f"policy: claim {s['claim']} GPUs, cool-down {s['cooldown']:g} s, start rule {s['start_rule']}; "
              f"server: cold start {cold:g} s, stop {args.stop:g} s, detection delay {args.detect_delay:g} s\n")
        print(summary_text(doc["summary"]))
        rows = doc["nodes"] if args.per_node <= 0 else doc["nodes"][:args.per_node]
        print()
        print(table(rows, NODE_COLUMNS))
        if len(rows) < len(doc["nodes"]):
            print(f"({len(doc['nodes']) - len(rows)} more nodes: --per-node 0 shows all, --json has them)")
    return EXIT_OK


def _header(doc: dict[str, Any], nodes: int) -> str:
    skipped = ", ".join(f"{n} {why}" for why, n in doc["skipped"].items()) or "none"
    lines = [f"replay of {doc['trace']}: {doc['jobs']:,} jobs on {nodes} nodes, {doc['window']['start']} .. "
             f"{doc['window']['end']} UTC ({doc['window']['days']:g} days); read in {doc['seconds']['read']:.1f} s, "
             f"replayed in {doc['seconds']['replay']:.1f} s",
             f"skipped lines: {skipped}",
             "GPU indices: sacct does not record them; each job gets the lowest free indices, as Slurm gives"]
    if doc["jobs_short_of_gpus"]:
        lines.append(f"{doc['jobs_short_of_gpus']} job-nodes asked for more GPUs than were free (the trace "
                     "overlaps itself): they got the free ones")
    return "\n".join(lines) + "\n"


def _case(combo: dict[str, Any], config: Config, delay: float, max_gpus: int) -> Case:
    claim = combo["claim"] if combo["claim"] != "all" else max_gpus
    policy = Policy(
        claim_gpus=int(claim), cooldown_seconds=float(combo["cooldown"]),
        yield_on_any_job=config.claim.yield_on_any_job,
        # The profile's timeout is for real loads; a replay only needs one the cold start fits in.
        startup_timeout_seconds=config.server.startup_timeout_seconds or max(900.0, 2 * float(combo["cold_start"])),
        backoff_initial_seconds=config.server.backoff_initial_seconds,
        backoff_max_seconds=config.server.backoff_max_seconds,
        start_rule=StartRule(combo["start_rule"]), cold_start_seconds=float(combo["cold_start"]),
    )
    model = ServerModel(cold_start=float(combo["cold_start"]), stop=float(combo["stop"]), detect_delay=delay)
    return Case(policy=policy, model=model)
