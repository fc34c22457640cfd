"""The text writer: dcgm-exporter's counter names, prometheus_client families, escaping; the collector guard."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from exporter_watchdog.metrics.exposition import Guarded, render_text


class OneCounter(Collector):
    def collect(self) -> Iterable[Metric]:
        m = Metric("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "Total energy (in mJ).", "counter")
        m.add_sample("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", {"gpu": "0", "Hostname": "n1"}, 12345.0)
        return [m]


def test_dcgm_counter_keeps_its_name_in_help_type_and_sample() -> None:
    registry = CollectorRegistry()
    registry.register(OneCounter())
    text = render_text(registry).decode()
    assert text.splitlines() == [
        "# HELP DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION Total energy (in mJ).",
        "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter",
        'DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION{gpu="0",Hostname="n1"} 12345.0',
    ]


def test_client_families_round_trip_through_the_parser() -> None:
    registry = CollectorRegistry()
    c = Counter("things", "Things done.", ["kind"], registry=registry)
    c.labels('a "quoted"\\ new\nline').inc(3)
    g = Gauge("level", "A level.\nSecond line of help.", registry=registry)
    g.set(-2.5)
    h = Histogram("wait_seconds", "Waits.", buckets=(0.1, 1.0), registry=registry)
    h.observe(0.5)
    Info("build", "Build.", registry=registry).info({"version": "1.2"})
    text = render_text(registry).decode()
    assert "_created" not in text
    assert "# TYPE things_total counter" in text
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    assert parsed["things"].type == "counter"
    assert parsed["things"].samples[0].labels == {"kind": 'a "quoted"\\ new\nline'}
    assert parsed["things"].samples[0].value == 3
    assert parsed["level"].samples[0].value == -2.5
    assert parsed["level"].documentation == "A level.\nSecond line of help."
    assert parsed["wait_seconds"].type == "histogram"
    buckets = {s.labels["le"]: s.value for s in parsed["wait_seconds"].samples if s.name.endswith("_bucket")}
    assert buckets == {"0.1": 0, "1.0": 1, "+Inf": 1}
    assert parsed["build_info"].type == "gauge"
    assert parsed["build_info"].samples[0].labels == {"version": "1.2"}


class Flaky(Collector):
    def __init__(self) -> None:
        self.fail = True

    def collect(self) -> Iterable[Metric]:
        m = Metric("flaky_value", "Sometimes there.", "gauge")
        m.add_sample("flaky_value", {}, 1.0)
        yield m
        if self.fail:
            raise RuntimeError("collector bug")


def test_guarded_collector_costs_only_its_own_families() -> None:
    registry = CollectorRegistry()
    flaky = Flaky()
    registry.register(Guarded(flaky, "flaky"))
    Gauge("steady", "Always there.", registry=registry).set(7)
    assert registry.get_sample_value("steady") == 7
    assert registry.get_sample_value("flaky_value") is None  # half-yielded families are dropped too
    assert b"steady 7.0" in render_text(registry)
    flaky.fail = False
    assert registry.get_sample_value("flaky_value") == 1
