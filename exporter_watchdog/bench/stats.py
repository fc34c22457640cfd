"""Run metrics with `vllm bench serve`'s field names and definitions."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from exporter_watchdog.bench.runner import RunOutcome

METRICS = ("ttft", "tpot", "itl", "e2el")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation between ranks (numpy's default)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean, 0 for no values."""
    return sum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    """Population standard deviation (numpy's default), 0 for no values."""
    if not values:
        return 0.0
    m = mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values))


def summarize(outcome: RunOutcome, percentiles: Sequence[float] = (99,)) -> dict[str, Any]:
    """The result dictionary of one run: totals, throughputs, latency statistics in ms, per-request arrays."""
    results = outcome.results
    ok = [r for r in results if r.success]
    duration = outcome.duration
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    samples: dict[str, list[float]] = {
        "ttft": [r.ttft for r in ok],
        # TPOT excludes the first token, as vLLM defines it.
        "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [x for r in ok for x in r.itl],
        "e2el": [r.latency for r in ok],
    }
    out: dict[str, Any] = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": total_out / duration if duration > 0 else 0.0,
        "total_token_throughput": (total_in + total_out) / duration if duration > 0 else 0.0,
        "max_output_tokens_per_s": peak_tokens_per_second(outcome),
        "max_concurrent_requests": outcome.max_concurrent_requests,
    }
    for name in METRICS:
        values = samples[name]
        out[f"mean_{name}_ms"] = mean(values) * 1000
        out[f"median_{name}_ms"] = percentile(values, 50) * 1000
        out[f"std_{name}_ms"] = std(values) * 1000
        for p in percentiles:
            out[f"p{p:g}_{name}_ms"] = percentile(values, p) * 1000
    out.update({
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "e2els": [r.latency for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
        "error_counts": dict(Counter(r.reason for r in results if not r.success)),
    })
    return out


def peak_tokens_per_second(outcome: RunOutcome) -> float:
    """The most streamed tokens that arrived within one whole second of the run."""
    buckets: Counter[int] = Counter()
    for r in outcome.results:
        if not r.success:
            continue
        t = r.start + r.ttft
        buckets[int(t)] += 1
        for gap in r.itl:
            t += gap
            buckets[int(t)] += 1
    return float(max(buckets.values())) if buckets else 0.0
