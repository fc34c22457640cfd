"""Prometheus text format 0.0.4 as dcgm-exporter writes it, and a guard for collectors that may fail."""

from __future__ import annotations

from collections.abc import Iterable

from loguru import logger
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# prometheus_client's own text writer names a counter family `<name>_total` in HELP/TYPE even when
# its samples have no such suffix, which is how dcgm-exporter's counters (DCGM_FI_DEV_TOTAL_ENERGY_
# CONSUMPTION) look. This writer names the family after its samples, and leaves out the `_created`
# samples: Prometheus ignores them in this format, they would only be extra series.
_TYPES = {"unknown": "untyped", "info": "gauge", "stateset": "gauge", "gaugehistogram": "histogram"}


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def render_text(registry: Collector) -> bytes:
    """Everything `registry` collects, in the Prometheus text format."""
    out: list[str] = []
    label_cache: dict[int, str] = {}  # samples of one GPU share one labels dict: escape it once
    keep: list[object] = []  # holds each cached dict alive so its id() is not reused in this render
    for metric in registry.collect():
        name = metric.name
        mtype = metric.type
        created = name + "_created"
        if mtype == "counter":
            header = name if any(s.name == name for s in metric.samples) else name + "_total"
        elif mtype == "info":
            header = name + "_info"
        else:
            header = name
        out.append(f"# HELP {header} {_escape_help(metric.documentation)}\n")
        out.append(f"# TYPE {header} {_TYPES.get(mtype, mtype)}\n")
        extra: dict[str, list[str]] = {}
        for s in metric.samples:
            if s.name == created:
                continue
            labels = s.labels
            labelstr = label_cache.get(id(labels))
            if labelstr is None:
                labelstr = (
                    "{" + ",".join(f'{k}="{_escape_value(v)}"' for k, v in labels.items()) + "}" if labels else ""
                )
                label_cache[id(labels)] = labelstr
                keep.append(labels)
            ts = f" {int(float(s.timestamp) * 1000)}" if s.timestamp is not None else ""
            line = f"{s.name}{labelstr} {floatToGoString(s.value)}{ts}\n"
            if mtype == "gaugehistogram" and s.name in (name + "_gsum", name + "_gcount"):
                extra.setdefault(s.name, []).append(line)
            else:
                out.append(line)
        for sname, lines in sorted(extra.items()):
            out.append(f"# HELP {sname} {_escape_help(metric.documentation)}\n# TYPE {sname} gauge\n")
            out.extend(lines)
    return "".join(out).encode("utf-8")


class Guarded(Collector):
    """A collector whose failures cost only its own families, logged once per failure streak."""

    def __init__(self, inner: Collector, name: str) -> None:
        self._inner = inner
        self._name = name
        self._failing = False

    def collect(self) -> Iterable[Metric]:
        try:
            metrics = list(self._inner.collect())
        except Exception:
            if not self._failing:
                logger.exception("collector {} failed; its families are left out until it recovers", self._name)
            self._failing = True
            return []
        if self._failing:
            logger.info("collector {} recovered", self._name)
        self._failing = False
        return metrics
