"""Does NVIDIA's own dcgm-exporter dashboard have data in every panel against `serve --demo`?

    .venv/bin/python benchmarks/dcgm_dashboard_check.py PATH/TO/dcgm-exporter-dashboard.json

The dashboard is NVIDIA's file (grafana/dcgm-exporter-dashboard.json in the NVIDIA/dcgm-exporter
repository), used unchanged and not shipped here: pass its path. The check starts the demo daemon and a
real Prometheus scraping it, puts load on the demo server, substitutes the dashboard's variables as
Grafana does with "All" selected ($instance, $gpu -> .*), and queries every panel's expressions until
each returns a number or the deadline passes. It prints the panels with and without data; exit status
1 when any panel has none. Run it under the shared CPU lock (it starts Prometheus).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from exporter_watchdog import targets  # noqa: E402
from tests.support.daemon import FAST_DEMO, DaemonProc  # noqa: E402
from tests.support.prom import Prometheus, require_binaries, write_prometheus_config  # noqa: E402

VARIABLE = re.compile(r"\$\{?(\w+)\}?")


@dataclass(frozen=True)
class PanelQuery:
    panel: str
    expr: str


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every panel's target expressions (rows' nested panels included)."""
    out: list[PanelQuery] = []
    stack = list(dashboard.get("panels", []))
    while stack:
        panel = stack.pop(0)
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            if target.get("expr"):
                out.append(PanelQuery(panel.get("title", "?"), target["expr"]))
    return out


def substitute(expr: str) -> str:
    """Grafana's view with every value of every variable selected; interval variables as durations."""
    durations = {"__rate_interval": "20s", "__interval": "5s", "__range": "5m"}
    return VARIABLE.sub(lambda m: durations.get(m.group(1), ".*"), expr)


def has_number(result: list[dict[str, Any]]) -> bool:
    for series in result:
        points = series.get("values") or ([series["value"]] if "value" in series else [])
        if any(not math.isnan(float(v)) for _t, v in points):
            return True
    return False


def _load(port: int, stop: threading.Event) -> None:
    """Requests to the demo server so its GPUs (and their profiling fields) have something to show."""
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            try:
                client.post(f"http://127.0.0.1:{port}/v1/completions",
                            json={"model": "demo", "prompt": "dashboard", "max_tokens": 64})
            except httpx.HTTPError:
                stop.wait(0.2)


def check(dashboard_path: Path, timeout: float = 120.0) -> tuple[list[str], list[str]]:
    """(panels with data, panels without) for NVIDIA's dashboard against the demo."""
    dashboard = json.loads(dashboard_path.read_text())
    queries = panel_queries(dashboard)
    if not queries:
        raise SystemExit(f"{dashboard_path}: no panel queries found")
    tools = require_binaries("prometheus")
    with tempfile.TemporaryDirectory(prefix="dcgm-dash-") as tmp_name:
        tmp = Path(tmp_name)
        daemon = DaemonProc(tmp, {**FAST_DEMO, "metrics": {"gpm_interval_seconds": 1.0}})
        prometheus: Prometheus | None = None
        stop = threading.Event()
        loader = threading.Thread(target=_load, args=(daemon.server_port, stop), daemon=True)
        try:
            daemon.start(timeout=60)
            daemon.demo_job("--gpus", "0")  # a job too: its GPU's series carry hpc_job
            loader.start()
            groups = targets.build_targets(["127.0.0.1"], daemon_port=daemon.metrics_port,
                                           server_port=daemon.server_port)
            config = write_prometheus_config(tmp / "prometheus", groups)
            prometheus = Prometheus(tools["prometheus"], config, tmp / "prometheus")
            started = time.time()
            prometheus.start()
            pending = list(queries)
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                end = time.time()
                pending = [q for q in pending
                           if not has_number(prometheus.query_range(substitute(q.expr), started, end, 1))]
                if pending:
                    time.sleep(1.0)
        finally:
            stop.set()
            if loader.is_alive():
                loader.join(30)
            if prometheus is not None:
                prometheus.close()
            daemon.stop()
    missing = sorted({q.panel for q in pending})
    with_data = sorted({q.panel for q in queries} - set(missing))
    return with_data, missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dashboard", type=Path, help="NVIDIA's dcgm-exporter-dashboard.json")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for data (default 120)")
    args = parser.parse_args()
    with_data, missing = check(args.dashboard, args.timeout)
    total = len(with_data) + len(missing)
    print(f"{args.dashboard.name}: {len(with_data)}/{total} panels have data against serve --demo")
    for title in with_data:
        print(f"  data     {title}")
    for title in missing:
        print(f"  NO DATA  {title}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
