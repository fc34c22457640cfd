"""MetricsServer over real HTTP on 127.0.0.1, and a real Prometheus scraping it."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from exporter_watchdog.core.model import Owner, Phase, Snapshot, YieldReason
from exporter_watchdog.demo.gpus import SimulatedGpus
from exporter_watchdog.metrics.daemon import DaemonMetrics, SnapshotCollector, snapshot_owners
from exporter_watchdog.metrics.exposition import Guarded
from exporter_watchdog.metrics.gpu import GpuCollector, XidWatcher
from exporter_watchdog.metrics.http import MetricsServer, parse_listen
from exporter_watchdog.metrics.nvml import GpuErrorKind


class Broken(Collector):
    def collect(self) -> Iterable[Metric]:
        raise RuntimeError("snapshot not published yet")


class Node:
    """A served registry like the daemon's: simulated GPUs (GPU 1 lost), daemon families, a broken collector."""

    def __init__(self) -> None:
        self.healthy = True
        self.status: dict[str, Any] = {"phase": "serving", "claimed_gpus": [2], "node": "vm1"}
        self.status_error: Exception | None = None
        self.snapshot = Snapshot(node="vm1", phase=Phase.SERVING, node_gpus=3, claimed_gpus=(2,),
                                 gpu_owner={0: Owner.FREE, 1: Owner.FREE, 2: Owner.WATCHDOG}, jobs=(),
                                 profile="demo", model="demo/model", server_pid=4242, server_ready=True)
        self.gpus = SimulatedGpus(3, lambda: 0.8, processes=lambda g: [(4242, 20 << 30)] if g == 2 else [])
        self.gpus.set_fault(1, GpuErrorKind.LOST)
        self.xids = XidWatcher(self.gpus, poll_seconds=0.1).start()
        self.registry = CollectorRegistry()
        self.metrics = DaemonMetrics(self.registry)
        self.metrics.yielded(YieldReason.JOB, 0.012)
        self.registry.register(Guarded(SnapshotCollector(lambda: self.snapshot), "snapshot"))
        self.registry.register(GpuCollector(self.gpus, "vm1", owners=snapshot_owners(lambda: self.snapshot),
                                            server_pids=lambda: {4242}, xids=self.xids))
        self.registry.register(Guarded(Broken(), "broken"))
        self.server = MetricsServer("127.0.0.1:0", self.registry, self._status, lambda: self.healthy)

    def _status(self) -> dict[str, Any]:
        if self.status_error is not None:
            raise self.status_error
        return self.status

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
def node() -> Iterator[Node]:
    n = Node()
    n.server.start()
    try:
        yield n
    finally:
        n.server.stop()
        n.xids.stop()


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_metrics_is_200_with_a_lost_gpu_and_a_broken_collector(node: Node) -> None:
    r = httpx.get(f"{node.url}/metrics", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert "content-encoding" not in r.headers
    fams = {f.name: f for f in text_string_to_metric_families(r.text)}
    util = {s.labels["gpu"]: s.value for s in fams["DCGM_FI_DEV_GPU_UTIL"].samples}
    assert set(util) == {"0", "2"}
    up = {s.labels["gpu"]: s.value for s in fams["exporter_watchdog_gpu_up"].samples}
    lost = {s.labels["gpu"]: s.value for s in fams["exporter_watchdog_gpu_lost"].samples}
    assert up == {"0": 1, "1": 0, "2": 1}
    assert lost == {"0": 0, "1": 1, "2": 0}
    assert "exporter_watchdog_state" in fams and "exporter_watchdog_yield_latency_seconds" in fams
    owners = {(s.labels["gpu"], s.labels["owner"]) for s in fams["exporter_watchdog_gpu_owner"].samples
              if s.value == 1}
    assert owners == {("0", "free"), ("1", "free"), ("2", "watchdog")}
    # dcgm-exporter's counter, named as it names it
    assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter\n" in r.text


def test_gzip_when_asked(node: Node) -> None:
    with httpx.Client() as client:
        r = client.get(f"{node.url}/metrics", headers={"Accept-Encoding": "gzip"})
        assert r.status_code == 200
        assert r.headers["content-encoding"] == "gzip"
        assert "DCGM_FI_DEV_FB_USED" in r.text  # httpx inflated it
        raw = client.send(client.build_request("GET", f"{node.url}/metrics",
                                               headers={"Accept-Encoding": "gzip"}), stream=True)
        body = b"".join(raw.iter_raw())
        raw.close()
        assert b"DCGM_FI_DEV_GPU_TEMP" in gzip.decompress(body)
        assert int(raw.headers["content-length"]) == len(body)


def test_healthz_follows_the_loop(node: Node) -> None:
    with httpx.Client() as client:  # one keep-alive connection for all of them
        r = client.get(f"{node.url}/healthz")
        assert (r.status_code, r.text) == (200, "ok\n")
        assert client.get(f"{node.url}/health").status_code == 200
        node.healthy = False
        assert client.get(f"{node.url}/healthz").status_code == 503
        node.healthy = True
        assert client.get(f"{node.url}/healthz").status_code == 200


def test_status_is_read_only_json(node: Node) -> None:
    r = httpx.get(f"{node.url}/status")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.json() == node.status
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        r = httpx.request(method, f"{node.url}/status", content=b'{"phase": "idle"}')
        assert r.status_code == 405, method
        assert r.headers["allow"] == "GET, HEAD"
    assert httpx.get(f"{node.url}/status").json() == node.status
    node.status_error = RuntimeError("no snapshot")
    r = httpx.get(f"{node.url}/status")
    assert r.status_code == 500 and "no snapshot" in r.json()["error"]


def test_unknown_paths_and_head(node: Node) -> None:
    assert httpx.get(f"{node.url}/").status_code == 404
    assert httpx.get(f"{node.url}/metrics/extra").status_code == 404
    r = httpx.head(f"{node.url}/metrics", headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 1000


def test_stop_frees_the_port_and_a_taken_port_is_a_clear_error(node: Node) -> None:
    port = node.server.port
    other = MetricsServer(f"127.0.0.1:{port}", CollectorRegistry(), dict, lambda: True)
    with pytest.raises(OSError, match=f"127.0.0.1:{port}"):
        other.start()
    node.server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert parse_listen(":9400") == ("0.0.0.0", 9400)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("9400", "host:", "host:http", "host:70000"):
        with pytest.raises(ValueError, match=bad):
            parse_listen(bad)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.prometheus
def test_real_prometheus_stores_the_dcgm_and_daemon_series(node: Node, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus is not installed (CI=true)")
        pytest.skip("prometheus is not installed")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: gpu\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{node.server.port}']}}]\n"
    )
    web = _free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web}", "--log.level=warn"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    api = f"http://127.0.0.1:{web}/api/v1"

    def query(expr: str) -> list[dict[str, Any]]:
        try:
            r = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
        except httpx.HTTPError:
            return []
        return list(r.json()["data"]["result"]) if r.status_code == 200 else []

    try:
        wait_for(lambda: len(query("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")) == 2, 60, "the energy counter")
        energy = query("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION")
        labels = {k for k in energy[0]["metric"] if k not in ("__name__", "instance", "job")}
        assert labels == {"gpu", "UUID", "device", "modelName", "pci_bus_id", "Hostname", "DCGM_FI_DRIVER_VERSION"}
        assert {e["metric"]["gpu"] for e in energy} == {"0", "2"}
        assert {e["metric"]["gpu"]: e["value"][1] for e in query("exporter_watchdog_gpu_up")} == {
            "0": "1", "1": "0", "2": "1"}
        assert query('exporter_watchdog_state{state="serving"}')[0]["value"][1] == "1"
        assert query('exporter_watchdog_yields_total{reason="job"}')[0]["value"][1] == "1"
        assert query("up")[0]["value"][1] == "1"

        def metadata_type() -> str | None:
            r = httpx.get(f"{api}/metadata", params={"metric": "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"}, timeout=5)
            entries = r.json()["data"].get("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", [])
            return entries[0]["type"] if entries else None

        wait_for(lambda: metadata_type() is not None, 30, "metadata")
        assert metadata_type() == "counter"
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
