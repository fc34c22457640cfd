"""NVIDIA's dcgm-exporter dashboard, unchanged, has data in every panel against a real Prometheus scraping the demo.

NVIDIA's file is not shipped here: set DCGM_EXPORTER_DASHBOARD to its path (grafana/dcgm-exporter-dashboard.json
of the NVIDIA/dcgm-exporter repository) to run this test; without it the test is skipped and says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.dcgm_dashboard_check import check, panel_queries, substitute

pytestmark = pytest.mark.prometheus


def test_substitution_selects_every_instance_and_gpu() -> None:
    expr = 'avg(DCGM_FI_DEV_GPU_TEMP{instance=~"$instance", gpu=~"${gpu}"}) [$__rate_interval]'
    assert substitute(expr) == 'avg(DCGM_FI_DEV_GPU_TEMP{instance=~".*", gpu=~".*"}) [20s]'
    doc = {"panels": [{"title": "a", "targets": [{"expr": "x"}]},
                      {"title": "row", "panels": [{"title": "b", "targets": [{"expr": "y"}, {"refId": "B"}]}]}]}
    assert [(q.panel, q.expr) for q in panel_queries(doc)] == [("a", "x"), ("b", "y")]


def test_nvidias_dashboard_has_data_in_every_panel() -> None:
    path = os.environ.get("DCGM_EXPORTER_DASHBOARD")
    if not path:
        pytest.skip("set DCGM_EXPORTER_DASHBOARD to NVIDIA's dcgm-exporter-dashboard.json (not shipped here)")
    with_data, missing = check(Path(path))
    assert missing == [], f"panels without data: {missing} (with data: {with_data})"
    assert len(with_data) >= 8
