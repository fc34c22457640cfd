"""Every query of the Grafana dashboard parses and returns data from a real Prometheus scraping the demo."""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter_watchdog import targets
from tests.support.daemon import DaemonProc
from tests.support.prom import (
    REPO,
    Prometheus,
    free_port,
    require_binaries,
    run_tool,
    wait_for,
    write_prometheus_config,
)
from tests.support.tunnel import FAKE_CLOUDFLARED

pytestmark = pytest.mark.prometheus

DASHBOARD = REPO / "grafana" / "dashboards" / "exporter-watchdog.json"
# Grafana's $__rate_interval is at least four scrape intervals; the test scrapes every second and
# takes a little more for a busy machine.
RATE_INTERVAL = "10s"
DATA_TIMEOUT = 90.0
START_TIMEOUT = 60.0
REQUESTS = 6
# The families with a `gpu` label.
PER_GPU = re.compile(r"DCGM_FI_DEV_|exporter_watchdog_gpu_(up|lost|owner|foreign_processes|xid_errors_total)")


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str
    instant: bool


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def panels() -> list[dict[str, Any]]:
    return [p for p in load_dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[Query]:
    return [
        Query(p["title"], t["refId"], t["expr"], bool(t.get("instant")) and not t.get("range"))
        for p in panels() for t in p["targets"]
    ]


def substitute(expr: str, range_seconds: int) -> str:
    """The expression as Grafana sends it with every node and GPU selected."""
    text = expr
    for name in ("node", "gpu"):
        text = text.replace("${" + name + "}", ".*").replace(f"${name}", ".*")
    text = text.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{range_seconds}s")
    text = text.replace("$__interval", "1s")
    assert "$" not in text, f"unsubstituted variable in {expr!r}"
    return text


def has_data(result: list[dict[str, Any]]) -> bool:
    """Some series has a value that is a number (NaN is what Grafana shows as no data)."""
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(not math.isnan(float(v)) for _t, v in points):
            return True
    return False


# --- the dashboard file alone ----------------------------------------------------------------------


def test_every_panel_queries_the_datasource_variable() -> None:
    assert len(panels()) >= 30
    for panel in panels():
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_node_and_gpu_variables() -> None:
    variables = {v["name"]: v for v in load_dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("node", "gpu"):
        var = variables[name]
        assert var["type"] == "query" and var["multi"] and var["includeAll"] and var["allValue"] == ".*"
    assert variables["node"]["query"]["query"] == "label_values(exporter_watchdog_build_info, node)"
    assert variables["gpu"]["query"]["query"] == 'label_values(DCGM_FI_DEV_GPU_UTIL{node=~"$node"}, gpu)'
    # Every query filters by node; the GPU families by GPU as well.
    for query in queries():
        if query.expr.startswith(":"):
            continue  # a fleet-wide recording rule
        assert 'node=~"$node"' in query.expr, query
        if PER_GPU.search(query.expr):
            assert 'gpu=~"$gpu"' in query.expr, query


def test_rates_use_grafana_intervals_not_fixed_windows() -> None:
    for query in queries():
        for window in re.findall(r"\[([^\]]+)\]", query.expr):
            assert window in ("$__rate_interval", "$__range"), query


def test_every_query_parses(tmp_path: Path) -> None:
    tools = require_binaries("promtool")
    rules = [{"record": f"dashboard:query_{i}", "expr": substitute(q.expr, 3600)} for i, q in enumerate(queries())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = run_tool([tools["promtool"], "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout


# --- against a real Prometheus scraping the demo ---------------------------------------------------


@dataclass
class DemoStack:
    daemon: DaemonProc
    prometheus: Prometheus
    started: float


def stream_requests(port: int, count: int) -> None:
    """Streamed chat completions: the stub observes TTFT and inter-token latency only when streaming."""
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            payload = {"model": "demo", "stream": True, "max_tokens": 12,
                       "messages": [{"role": "user", "content": f"request {i} for the dashboard"}]}
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=payload) as response:
                assert response.status_code == 200
                for _ in response.iter_lines():
                    pass


@pytest.fixture(scope="module")
def demo_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoStack]:
    tools = require_binaries("prometheus")
    tmp = tmp_path_factory.mktemp("dash")
    # The tunnel connector is played by tests/support/fake_cloudflared.py (no cloudflared here).
    tunnel_port = free_port()
    (tmp / "tunnel-token").write_text("dashboard-test-token\n")
    tunnel = {"enabled": True, "cloudflared": FAKE_CLOUDFLARED, "token_file": str(tmp / "tunnel-token"),
              "metrics": f"127.0.0.1:{tunnel_port}", "grace_seconds": 1.0, "allow_unauthenticated": True}
    daemon = DaemonProc(tmp, {"claim": {"gpus": 2, "cooldown_seconds": 1.0}, "tunnel": tunnel})
    prometheus: Prometheus | None = None
    try:
        daemon.start(timeout=START_TIMEOUT)
        groups = targets.build_targets(["127.0.0.1"], daemon_port=daemon.metrics_port, server_port=daemon.server_port,
                                       tunnel_metrics_port=tunnel_port)
        # Written by hand: one without a node label, one for a job that no scrape config keeps.
        groups += [{"targets": [f"localhost:{free_port()}"], "labels": {"job": "exporter-watchdog"}},
                   {"targets": [f"127.0.0.1:{free_port()}"], "labels": {"job": "unknown", "node": "n9"}}]
        config = write_prometheus_config(tmp / "prometheus", groups)
        prometheus = Prometheus(tools["prometheus"], config, tmp / "prometheus")
        started = time.time()
        prometheus.start()
        prometheus.wait_for_query('up{job="vllm"} == 1 and on() up{job="exporter-watchdog"} == 1', START_TIMEOUT)

        stream_requests(daemon.server_port, REQUESTS)
        prometheus.wait_for_query("vllm:generation_tokens_total > 0", START_TIMEOUT)

        # A job on one of the server's GPUs: the daemon yields, then serves again on other GPUs.
        job = daemon.demo_job("--gpus", "3", "--seconds", "0")
        daemon.wait_status(lambda d: d["last_yield"] is not None and d["last_yield"]["jobs"] == [job],
                           START_TIMEOUT, "the yield")
        daemon.wait_state("serving", START_TIMEOUT)
        stream_requests(daemon.server_port, REQUESTS)
        prometheus.wait_for_query('exporter_watchdog_yields_total{reason="job"} == 1', START_TIMEOUT)
        yield DemoStack(daemon, prometheus, started)
    finally:
        if prometheus is not None:
            prometheus.close()
        daemon.stop()


def test_every_query_returns_data_after_requests_and_a_yield(demo_stack: DemoStack) -> None:
    prometheus = demo_stack.prometheus
    pending = queries()

    def all_have_data() -> bool:
        """Query what had no data yet; True once nothing is left."""
        nonlocal pending
        end = time.time()
        range_seconds = math.ceil(end - demo_stack.started) + 1
        still: list[Query] = []
        for query in pending:
            expr = substitute(query.expr, range_seconds)
            if query.instant:
                result = prometheus.query(expr, at=end)
            else:
                result = prometheus.query_range(expr, demo_stack.started, end, 1)
            if not has_data(result):
                still.append(query)
        pending = still
        return not still

    try:
        wait_for(all_have_data, DATA_TIMEOUT, "every dashboard query to return data")
    except TimeoutError:
        lines = [f"  {q.panel} [{q.ref}]: {q.expr}" for q in pending]
        pytest.fail("panels without data:\n" + "\n".join(lines), pytrace=False)
    assert pending == []


def test_targets_are_kept_by_their_job_and_labelled_with_their_node(demo_stack: DemoStack) -> None:
    active = {(t["labels"]["job"], t["labels"]["node"]) for t in demo_stack.prometheus.targets()}
    assert active == {("exporter-watchdog", "127.0.0.1"), ("vllm", "127.0.0.1"), ("cloudflared", "127.0.0.1"),
                      ("exporter-watchdog", "localhost")}


def test_variables_list_the_demo_node_and_its_gpus(demo_stack: DemoStack) -> None:
    prometheus = demo_stack.prometheus
    assert prometheus.label_values("node", "exporter_watchdog_build_info") == ["127.0.0.1"]
    gpus = prometheus.label_values("gpu", 'DCGM_FI_DEV_GPU_UTIL{node=~".*"}')
    assert sorted(gpus, key=int) == ["0", "1", "2", "3"]


# Names the rules use that a healthy demo node does not export, and why.
ABSENT_IN_DEMO = {
    "exporter_watchdog_gpu_xid_errors_total": "a series appears with a GPU's first XID",
}
OUR_NAMES = re.compile(r"(?:exporter_watchdog_|DCGM_FI_DEV_|vllm:|cloudflared_|node:|:)[A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric and recording-rule names an expression reads (label values and matchers left out)."""
    bare = re.sub(r'"[^"]*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    return {m for m in OUR_NAMES.findall(bare) if m not in (":", "node:")}


def test_every_name_the_rules_and_dashboard_read_is_in_the_demo(demo_stack: DemoStack) -> None:
    rule_files = sorted((REPO / "prometheus" / "rules").glob("*.yml"))
    exprs = [r["expr"] for path in rule_files for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
    exprs += [q.expr for q in queries()]
    used = set().union(*(metric_names(e) for e in exprs))
    assert "DCGM_FI_DEV_FB_USED" in used and "vllm:generation_tokens_total" in used
    stored = set(demo_stack.prometheus.label_values("__name__", '{__name__=~".+"}'))
    missing = used - stored - set(ABSENT_IN_DEMO)
    assert missing == set(), f"read by rules or panels but not exported by the demo: {sorted(missing)}"
