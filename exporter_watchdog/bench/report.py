"""What a run shows and leaves behind: the progress bar, terminal tables, result JSON and the sweep plot."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from html import escape
from pathlib import Path
from typing import Any, TextIO

from exporter_watchdog.bench.runner import RequestResult
from exporter_watchdog.plot import nice_ticks as _nice_ticks


class Progress:
    """A progress bar on a terminal; a line every tenth of the run elsewhere (logs, pipes)."""

    def __init__(self, total: int, stream: TextIO, label: str = "bench") -> None:
        self.total, self.stream, self.label = total, stream, label
        self.done = self.failed = 0
        self.tty = bool(getattr(stream, "isatty", lambda: False)())
        self._start = time.monotonic()
        self._drawn = 0.0
        self._next_step = 1

    def update(self, result: RequestResult) -> None:
        """Count one finished request."""
        self.done += 1
        self.failed += 0 if result.success else 1
        if self.tty:
            now = time.monotonic()
            if now - self._drawn >= 0.1 or self.done == self.total:
                self._drawn = now
                self._draw()
        elif self.done * 10 >= self._next_step * self.total or self.done == self.total:
            self._next_step = self.done * 10 // max(self.total, 1) + 1
            self.stream.write(f"{self.label}: {self.done}/{self.total} done, {self.failed} failed\n")
            self.stream.flush()

    def _draw(self) -> None:
        width = 30
        filled = width * self.done // max(self.total, 1)
        elapsed = time.monotonic() - self._start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
                          f"  failed {self.failed}  {rate:.1f} req/s  {elapsed:.0f} s ")
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.tty:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()


def result_table(result: dict[str, Any]) -> str:
    """The run's numbers laid out like `vllm bench serve` prints them."""
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value: Any) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40}{text:>10}")

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency"):
        row("Maximum request concurrency:", result["max_concurrency"])
    rate = result.get("request_rate")
    if rate is not None:
        row("Request rate configured (RPS):", "inf" if rate == "inf" else float(rate))
    row("Benchmark duration (s):", result["duration"])
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"])
    row("Output token throughput (tok/s):", result["output_throughput"])
    row("Peak output token throughput (tok/s):", result["max_output_tokens_per_s"])
    row("Peak concurrent requests:", result["max_concurrent_requests"])
    row("Total token throughput (tok/s):", result["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name, title in titles.items():
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        label = name.upper()
        row(f"Mean {label} (ms):", result[f"mean_{name}_ms"])
        row(f"Median {label} (ms):", result[f"median_{name}_ms"])
        for key in result:
            if key.startswith("p") and key.endswith(f"_{name}_ms") and key.count("_") == 2:
                row(f"P{key[1:].split('_')[0]} {label} (ms):", result[key])
    if result["error_counts"]:
        lines.append("{s:{c}^{n}}".format(s="Failures", n=50, c="-"))
        for reason, count in sorted(result["error_counts"].items()):
            row(f"{reason}:", count)
        first = next(e for e in result["errors"] if e)
        lines.append(f"first error: {first[:200]}")
    lines.append("=" * 50)
    return "\n".join(lines)


SWEEP_COLUMNS = (
    ("conc", "max_concurrency", "{:d}"), ("ok", "completed", "{:d}"), ("failed", "failed", "{:d}"),
    ("req/s", "request_throughput", "{:.2f}"), ("out tok/s", "output_throughput", "{:.1f}"),
    ("TTFT p50", "median_ttft_ms", "{:.1f}"), ("TTFT p99", "p99_ttft_ms", "{:.1f}"),
    ("TPOT p50", "median_tpot_ms", "{:.1f}"), ("ITL p50", "median_itl_ms", "{:.1f}"),
    ("E2EL p50", "median_e2el_ms", "{:.1f}"), ("E2EL p99", "p99_e2el_ms", "{:.1f}"),
)


def sweep_table(results: Sequence[dict[str, Any]]) -> str:
    """One row per concurrency level; latencies in ms."""
    rows = [[h for h, _, _ in SWEEP_COLUMNS]]
    for r in results:
        rows.append([fmt.format(r.get(key, 0) or 0) for _, key, fmt in SWEEP_COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(SWEEP_COLUMNS))]
    out = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write the result, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def sweep_svg(results: Sequence[dict[str, Any]], title: str) -> str:
    """An SVG plot of output throughput (x) against median and p99 end-to-end latency (y), one point per level."""
    w, h, left, right, top, bottom = 720, 470, 80, 30, 64, 60
    pw, ph = w - left - right, h - top - bottom
    xs = [float(r["output_throughput"]) for r in results]
    series = [("median E2EL", "median_e2el_ms", "#1f77b4"), ("p99 E2EL", "p99_e2el_ms", "#d62728")]
    y_hi = max([float(r.get(k, 0) or 0) for r in results for _, k, _ in series] + [1.0])
    xt, yt = _nice_ticks(max(xs + [1.0]) * 1.05), _nice_ticks(y_hi * 1.05)
    x_max, y_max = xt[-1], yt[-1]

    def px(x: float) -> float:
        return left + pw * x / x_max

    def py(y: float) -> float:
        return top + ph - ph * y / y_max

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
             'font-family="sans-serif" font-size="12">',
             f'<rect width="{w}" height="{h}" fill="white"/>',
             f'<text x="{w / 2}" y="24" text-anchor="middle" font-size="15">{escape(title)}</text>']
    for x in xt:
        parts.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{px(x):.1f}" y="{top + ph + 18}" text-anchor="middle">{x:g}</text>')
    for y in yt:
        parts.append(f'<line x1="{left}" y1="{py(y):.1f}" x2="{left + pw}" y2="{py(y):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{left - 8}" y="{py(y) + 4:.1f}" text-anchor="end">{y:g}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 15}" text-anchor="middle">output throughput (tok/s)</text>')
    parts.append(f'<text transform="translate(20 {top + ph / 2}) rotate(-90)" text-anchor="middle">'
                 'end-to-end latency (ms)</text>')
    for i, (name, key, color) in enumerate(series):
        pts = [(px(x), py(float(r.get(key, 0) or 0)), r.get("max_concurrency"))
               for x, r in zip(xs, results, strict=True)]
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for x, y, conc in pts:
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}"/>')
            if key.startswith("p99"):
                parts.append(f'<text x="{x:.1f}" y="{y - 8:.1f}" text-anchor="middle" font-size="10">c={conc}</text>')
        # The legend sits above the plot area, where no point can hide it.
        lx = left + pw - 260 + 130 * i
        parts.append(f'<line x1="{lx}" y1="{top - 12}" x2="{lx + 24}" y2="{top - 12}" stroke="{color}" '
                     'stroke-width="2"/>')
        parts.append(f'<text x="{lx + 30}" y="{top - 8}">{escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
