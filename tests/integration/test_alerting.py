"""The shipped rules and Alertmanager config on real Prometheus and Alertmanager, delivering to a loopback ntfy."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from exporter_watchdog import targets
from tests.support.daemon import DaemonProc
from tests.support.prom import (
    PROMETHEUS_DIR,
    Alertmanager,
    NtfyStandIn,
    Prometheus,
    RecordedRequest,
    require_binaries,
    write_alertmanager_config,
    write_prometheus_config,
)

pytestmark = pytest.mark.prometheus

# Generous for a busy 2-core machine: a gauge change reaches the webhook in 1-2.5 s when idle.
NOTICE_TIMEOUT = 60.0
# The informational alert looks back one minute; it resolves once the yield has left that window.
RESOLVE_TIMEOUT = 180.0
PRIORITY = {"critical": "5", "warning": "4", "info": "2"}


@pytest.fixture
def token() -> str:
    return "tk_" + secrets.token_hex(15)[:29]


@pytest.fixture
def ntfy() -> Iterator[NtfyStandIn]:
    with NtfyStandIn() as standin:
        yield standin


@pytest.fixture
def alertmanager(tmp_path: Path, ntfy: NtfyStandIn, token: str) -> Iterator[Alertmanager]:
    tools = require_binaries("alertmanager")
    config = write_alertmanager_config(tmp_path / "alertmanager", ntfy.url, token)
    am = Alertmanager(tools["alertmanager"], config, tmp_path / "alertmanager")
    try:
        am.start()
        yield am
    finally:
        am.close()


def notice(alertname: str, status: str, **labels: str) -> Any:
    """A matcher for ntfy requests that carry `alertname` in `status` with the given labels."""
    def match(request: RecordedRequest) -> bool:
        body = request.json()
        return body["status"] == status and any(
            a["labels"].get("alertname") == alertname and a["status"] == status
            and all(a["labels"].get(k) == v for k, v in labels.items())
            for a in body["alerts"]
        )
    return match


def assert_ntfy_request(request: RecordedRequest, severity: str, token: str) -> dict[str, Any]:
    """The request is what ntfy needs: topic path, template, priority, token; returns the payload."""
    assert request.method == "POST"
    assert request.path == f"/exporter-watchdog-{severity}"
    assert request.query["template"] == ["alertmanager"]
    assert request.query["priority"] == [PRIORITY[severity]]
    assert request.headers["authorization"] == f"Bearer {token}"
    assert request.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = request.json()
    assert body["version"] == "4"
    assert body["receiver"] == f"ntfy-{severity}"
    return body


def post_alerts(am: Alertmanager, alerts: list[dict[str, Any]]) -> None:
    response = httpx.post(f"{am.url}/api/v2/alerts", json=alerts, timeout=10)
    assert response.status_code == 200, response.text


def test_severities_route_to_their_topics_and_a_dead_daemon_silences_its_node(
    alertmanager: Alertmanager, ntfy: NtfyStandIn, token: str
) -> None:
    down = {"labels": {"alertname": "ExporterWatchdogDown", "severity": "critical", "node": "n1",
                       "job": "exporter-watchdog", "instance": "n1:9400"},
            "annotations": {"summary": "exporter-watchdog on n1 is down"}}
    post_alerts(alertmanager, [down])
    body = assert_ntfy_request(
        ntfy.wait_for(notice("ExporterWatchdogDown", "firing", node="n1"), NOTICE_TIMEOUT, "the critical notice"),
        "critical", token,
    )
    assert body["groupLabels"] == {"alertname": "ExporterWatchdogDown", "node": "n1"}
    assert body["alerts"][0]["annotations"]["summary"] == "exporter-watchdog on n1 is down"

    hot = [{"labels": {"alertname": "ExporterWatchdogGPUTooHot", "severity": "warning", "node": node, "gpu": "0"}}
           for node in ("n1", "n2")]
    yielded = {"labels": {"alertname": "ExporterWatchdogJobOnServerGPUs", "severity": "info", "node": "n1",
                          "reason": "job"}}
    post_alerts(alertmanager, [*hot, yielded])
    assert_ntfy_request(
        ntfy.wait_for(notice("ExporterWatchdogGPUTooHot", "firing", node="n2"), NOTICE_TIMEOUT, "warning n2"),
        "warning", token,
    )
    # The daemon being down on n1 holds back n1's other alerts, of any severity; n2 is not affected.
    suppressed = {
        a["labels"]["alertname"] for a in alertmanager.alerts()
        if a["labels"]["node"] == "n1" and a["status"]["state"] == "suppressed" and a["status"]["inhibitedBy"]
    }
    assert suppressed == {"ExporterWatchdogGPUTooHot", "ExporterWatchdogJobOnServerGPUs"}
    assert not any(notice("ExporterWatchdogGPUTooHot", "firing", node="n1")(r) for r in ntfy.requests())

    # The daemon comes back: its resolved notice goes out, and n1's held-back alerts with it.
    ended = (datetime.now(timezone.utc) - timedelta(seconds=1)).isoformat()
    post_alerts(alertmanager, [{**down, "endsAt": ended}])
    assert_ntfy_request(
        ntfy.wait_for(notice("ExporterWatchdogDown", "resolved", node="n1"), NOTICE_TIMEOUT, "resolved critical"),
        "critical", token,
    )
    assert_ntfy_request(
        ntfy.wait_for(notice("ExporterWatchdogGPUTooHot", "firing", node="n1"), NOTICE_TIMEOUT, "warning n1"),
        "warning", token,
    )
    assert_ntfy_request(
        ntfy.wait_for(notice("ExporterWatchdogJobOnServerGPUs", "firing", node="n1"), NOTICE_TIMEOUT, "info n1"),
        "info", token,
    )


def test_a_demo_yield_reaches_ntfy_through_prometheus_and_alertmanager_then_resolves(
    tmp_path: Path, alertmanager: Alertmanager, ntfy: NtfyStandIn, token: str
) -> None:
    tools = require_binaries("prometheus")
    daemon = DaemonProc(tmp_path, {"claim": {"gpus": 2, "cooldown_seconds": 1.0}})
    prometheus: Prometheus | None = None
    try:
        status = daemon.start().status()
        assert status is not None and status["claimed_gpus"] == [2, 3]
        # The targets file exactly as `exporter-watchdog targets` writes it for a node named 127.0.0.1.
        groups = targets.build_targets(["127.0.0.1"], daemon_port=daemon.metrics_port, server_port=daemon.server_port)
        config = write_prometheus_config(tmp_path / "prometheus", groups, alertmanager=f"127.0.0.1:{alertmanager.port}")
        prometheus = Prometheus(tools["prometheus"], config, tmp_path / "prometheus")
        prometheus.start()
        # Every group of the shipped rule files is loaded.
        shipped = [g for f in sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
                   for g in yaml.safe_load(f.read_text())["groups"]]
        assert len(prometheus.rules()) == len(shipped) >= 4

        # The counter's 0 must be stored before the yield, or no increase can be seen.
        prometheus.wait_for_query('exporter_watchdog_yields_total{job="exporter-watchdog", node="127.0.0.1", '
                                  'reason="job"} == 0', NOTICE_TIMEOUT)
        prometheus.wait_for_query('up{job="vllm", node="127.0.0.1"} == 1', NOTICE_TIMEOUT)
        assert not any(notice("ExporterWatchdogJobOnServerGPUs", "firing")(r) for r in ntfy.requests())

        yield_requested = time.time()
        job = daemon.demo_job("--gpus", "3", "--seconds", "0")
        daemon.wait_status(lambda d: d["last_yield"] is not None and d["last_yield"]["jobs"] == [job],
                           NOTICE_TIMEOUT, "the yield")

        fired = ntfy.wait_for(notice("ExporterWatchdogJobOnServerGPUs", "firing", node="127.0.0.1"),
                              NOTICE_TIMEOUT, "the informational notice")
        assert fired.received_at > yield_requested
        body = assert_ntfy_request(fired, "info", token)
        (alert,) = body["alerts"]
        assert alert["labels"] == {"alertname": "ExporterWatchdogJobOnServerGPUs", "severity": "info",
                                   "node": "127.0.0.1", "reason": "job", "job": "exporter-watchdog",
                                   "instance": f"127.0.0.1:{daemon.metrics_port}"}
        assert alert["annotations"]["summary"] == "A job took the server's GPUs on 127.0.0.1"
        assert "(reason job)" in alert["annotations"]["description"]
        assert "docs/monitoring.md#exporterwatchdogjobonservergpus" in alert["annotations"]["runbook"]

        resolved = ntfy.wait_for(notice("ExporterWatchdogJobOnServerGPUs", "resolved", node="127.0.0.1"),
                                 RESOLVE_TIMEOUT, "the resolved notice")
        body = assert_ntfy_request(resolved, "info", token)
        assert body["alerts"][0]["endsAt"] > body["alerts"][0]["startsAt"]
        # One firing and one resolved notice: informational alerts do not repeat.
        infos = [r for r in ntfy.requests() if r.path == "/exporter-watchdog-info"]
        assert [r.json()["status"] for r in infos] == ["firing", "resolved"]
        # Nothing else fired on a healthy demo node.
        assert {r.path for r in ntfy.requests()} == {"/exporter-watchdog-info"}
    finally:
        if prometheus is not None:
            prometheus.close()
        daemon.stop()
