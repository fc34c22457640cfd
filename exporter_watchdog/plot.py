"""Hand-written SVG line plots (no plotting dependency): tick placement and side-by-side panels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def nice_ticks(hi: float, count: int = 5) -> list[float]:
    """Round tick values from 0 up to at least `hi`."""
    if hi <= 0:
        return [0.0, 1.0]
    raw = hi / count
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [step * i for i in range(math.ceil(hi / step - 1e-9) + 1)]


@dataclass(frozen=True)
class Line:
    """One named series: points (x, y), drawn in `color`, dashed when asked."""

    name: str
    points: Sequence[tuple[float, float]]
    color: str
    dashed: bool = False


@dataclass(frozen=True)
class Panel:
    """One plot: a y label and its lines, sharing the figure's x axis."""

    y_label: str
    lines: Sequence[Line]


def panels_svg(title: str, x_label: str, panels: Sequence[Panel], x_ticks: Sequence[float] | None = None) -> str:
    """Panels side by side, one legend above them all (lines are matched by name across panels)."""
    pw, ph, left, gap, top, bottom = 380, 300, 70, 90, 90, 55
    w = left + len(panels) * pw + (len(panels) - 1) * gap + 30
    h = top + ph + bottom
    xs = [x for p in panels for line in p.lines for x, _ in line.points] or [1.0]
    xt = list(x_ticks) if x_ticks else nice_ticks(max(xs) * 1.05)
    x_lo, x_hi = min(xt), max(xt) if max(xt) > min(xt) else min(xt) + 1
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    legend: dict[str, Line] = {}
    for k, panel in enumerate(panels):
        ox = left + k * (pw + gap)
        ys = [y for line in panel.lines for _, y in line.points] or [1.0]
        yt = nice_ticks(max(max(ys), 1e-9) * 1.05)
        y_hi = yt[-1]

        def px(x: float, ox: float = ox) -> float:
            return ox + pw * (x - x_lo) / (x_hi - x_lo)

        def py(y: float, y_hi: float = y_hi) -> float:
            return top + ph - ph * y / y_hi

        for x in xt:
            parts.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + ph}" stroke="#eee"/>')
            parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x:g}</text>')
        for y in yt:
            parts.append(f'<line x1="{ox}" y1="{py(y):.1f}" x2="{ox + pw}" y2="{py(y):.1f}" stroke="#eee"/>')
            parts.append(f'<text x="{ox - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
        parts.append(f'<rect x="{ox}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
        parts.append(f'<text x="{ox + pw / 2}" y="{h - 15}" text-anchor="middle">{escape(x_label)}</text>')
        parts.append(f'<text transform="translate({ox - 50} {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                     f'{escape(panel.y_label)}</text>')
        for line in panel.lines:
            legend.setdefault(line.name, line)
            pts = sorted((px(x), py(y)) for x, y in line.points)
            dash = ' stroke-dasharray="6 4"' if line.dashed else ""
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            parts.append(f'<polyline points="{path}" fill="none" stroke="{line.color}" stroke-width="2"{dash}/>')
            for x, y in pts:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{line.color}"/>')
    # The legend sits above the plot areas, where no point can hide it.
    for i, line in enumerate(legend.values()):
        lx = left + (i % 4) * 200
        ly = 48 + (i // 4) * 18
        dash = ' stroke-dasharray="6 4"' if line.dashed else ""
        parts.append(f'<line x1="{lx}" y1="{ly}" x2="{lx + 24}" y2="{ly}" stroke="{line.color}" '
                     f'stroke-width="2"{dash}/>')
        parts.append(f'<text x="{lx + 30}" y="{ly + 4}">{escape(line.name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
