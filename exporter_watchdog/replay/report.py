"""What a replay shows: totals, the terminal summary, the per-node table, the sweep table and plot."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from exporter_watchdog.plot import COLORS, Line, Panel, panels_svg
from exporter_watchdog.replay.simulate import NodeResult

HOUR = 3600.0


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0


def summarize(results: Sequence[NodeResult]) -> dict[str, Any]:
    """Totals over the nodes, GPU-hours and counts, with the ratios an admin asks about."""
    idle = sum(r.idle for r in results)
    bound = sum(r.clairvoyant for r in results)
    harvested = sum(r.harvested for r in results)
    starts = sum(r.starts for r in results)
    yields = sum(r.yields for r in results)
    wasted = sum(r.wasted for r in results)
    node_days = sum(r.seconds for r in results) / 86400.0
    return {
        "nodes": len(results),
        "gpus": sum(r.gpus for r in results),
        "node_days": round(node_days, 3),
        "gpu_hours": round(sum(r.gpus * r.seconds for r in results) / HOUR, 3),
        "idle_gpu_hours": round(idle / HOUR, 3),
        "clairvoyant_gpu_hours": round(bound / HOUR, 3),
        "harvested_gpu_hours": round(harvested / HOUR, 3),
        "efficiency": round(_ratio(harvested, idle), 5),
        "clairvoyant_efficiency": round(_ratio(bound, idle), 5),
        "of_clairvoyant": round(_ratio(harvested, bound), 5),
        "starts": starts,
        "yields": yields,
        "wasted_starts": wasted,
        "wasted_gpu_hours": round(sum(r.wasted_gpu_seconds for r in results) / HOUR, 3),
        "yields_per_node_day": round(_ratio(yields, node_days), 4),
        "conflicts": sum(r.conflicts for r in results),
        "startup_timeouts": sum(r.timeouts for r in results),
    }


def node_row(r: NodeResult) -> dict[str, Any]:
    """One node's numbers for --json and the per-node table."""
    days = r.seconds / 86400.0
    return {
        "node": r.node, "gpus": r.gpus, "idle_gpu_hours": round(r.idle / HOUR, 3),
        "clairvoyant_gpu_hours": round(r.clairvoyant / HOUR, 3),
        "harvested_gpu_hours": round(r.harvested / HOUR, 3), "efficiency": round(_ratio(r.harvested, r.idle), 5),
        "starts": r.starts, "yields": r.yields, "wasted_starts": r.wasted,
        "wasted_gpu_hours": round(r.wasted_gpu_seconds / HOUR, 3),
        "yields_per_day": round(_ratio(r.yields, days), 3),
    }


def summary_text(s: dict[str, Any]) -> str:
    """The terminal summary for people."""
    rows = [
        ("GPU-hours in the window", f"{s['gpu_hours']:,.1f}", f"{s['nodes']} nodes, {s['gpus']} GPUs"),
        ("idle GPU-hours (no job)", f"{s['idle_gpu_hours']:,.1f}",
         f"{100 * _ratio(s['idle_gpu_hours'], s['gpu_hours']):.1f}% of all"),
        ("clairvoyant bound", f"{s['clairvoyant_gpu_hours']:,.1f}",
         f"{100 * s['clairvoyant_efficiency']:.1f}% of idle"),
        ("harvested GPU-hours (ready)", f"{s['harvested_gpu_hours']:,.1f}",
         f"efficiency {100 * s['efficiency']:.1f}% of idle, {100 * s['of_clairvoyant']:.1f}% of the bound"),
        ("server starts", f"{s['starts']:,}", ""),
        ("yields", f"{s['yields']:,}", f"{s['yields_per_node_day']:.2f} per node-day"),
        ("wasted starts (yielded loading)", f"{s['wasted_starts']:,}",
         f"{100 * _ratio(s['wasted_starts'], s['starts']):.1f}% of starts, "
         f"{s['wasted_gpu_hours']:,.1f} GPU-hours spent loading"),
    ]
    if s["startup_timeouts"]:
        rows.append(("start-up timeouts", f"{s['startup_timeouts']:,}", "cold start >= the start-up timeout"))
    width = max(len(r[0]) for r in rows) + 2
    vwidth = max(len(r[1]) for r in rows) + 2
    return "\n".join(f"{label:<{width}}{value:>{vwidth}}  {note}".rstrip() for label, value, note in rows)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A right-aligned text table: columns are (heading, key, format)."""
    cells = [[h for h, _, _ in columns]]
    for row in rows:
        cells.append([fmt.format(row[key]) for _, key, fmt in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cell, widths, strict=True)) for cell in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


NODE_COLUMNS = (
    ("node", "node", "{}"), ("GPUs", "gpus", "{}"), ("idle GPU-h", "idle_gpu_hours", "{:,.1f}"),
    ("bound GPU-h", "clairvoyant_gpu_hours", "{:,.1f}"), ("harvest GPU-h", "harvested_gpu_hours", "{:,.1f}"),
    ("eff %", "efficiency", "{:.1%}"), ("starts", "starts", "{}"), ("yields", "yields", "{}"),
    ("wasted", "wasted_starts", "{}"), ("yields/day", "yields_per_day", "{:.2f}"),
)
SWEEP_COLUMNS = (
    ("claim", "claim", "{}"), ("cool-down s", "cooldown", "{:g}"), ("rule", "start_rule", "{}"),
    ("harvest GPU-h", "harvested_gpu_hours", "{:,.1f}"), ("eff %", "efficiency", "{:.1%}"),
    ("of bound %", "of_clairvoyant", "{:.1%}"), ("starts", "starts", "{:,}"), ("yields", "yields", "{:,}"),
    ("wasted", "wasted_starts", "{:,}"), ("wasted GPU-h", "wasted_gpu_hours", "{:,.1f}"),
    ("yields/node-day", "yields_per_node_day", "{:.2f}"),
)


def sweep_svg(rows: Sequence[dict[str, Any]], title: str) -> str:
    """Harvest efficiency and wasted starts against cool-down, one line per claim (and start rule)."""
    series: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["claim"], row["start_rule"]), []).append(row)
    rules = {rule for _, rule in series}
    claims = sorted({claim for claim, _ in series}, key=str)
    eff, wasted = [], []
    for (claim, rule), items in sorted(series.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        name = f"claim {claim}" + (f", {rule}" if len(rules) > 1 else "")
        color = COLORS[claims.index(claim) % len(COLORS)]
        dashed = rule == "learned" and len(rules) > 1
        eff.append(Line(name, [(r["cooldown"], 100 * r["efficiency"]) for r in items], color, dashed))
        wasted.append(Line(name, [(r["cooldown"], r["wasted_starts"]) for r in items], color, dashed))
    ticks = sorted({float(r["cooldown"]) for r in rows})
    x_ticks = ticks if len(ticks) > 1 else None
    return panels_svg(title, "cool-down (s)", [Panel("harvested / idle GPU-hours (%)", eff),
                                               Panel("wasted starts", wasted)], x_ticks)
