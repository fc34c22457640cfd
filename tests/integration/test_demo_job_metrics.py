"""The demo shows every GPU family: dcgm-exporter's defaults, GPM profiling that follows the stub's load,
`hpc_job` and job info from demo jobs, and memory by owner and job."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import httpx

from exporter_watchdog.metrics.gpu import DCGM_FAMILIES, DRIVER_LABEL
from tests.support.daemon import FAST_DEMO, DaemonProc, wait_until

NEW_FAMILIES = ("exporter_watchdog_gpu_job_info", "exporter_watchdog_gpu_memory_used_bytes")


SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(daemon: DaemonProc) -> dict[str, list[dict[str, Any]]]:
    """Sample name -> its label sets and values, read line by line (counters keep dcgm-exporter's names)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for line in daemon.metrics().splitlines():
        match = SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        name, labels, value = match.groups()
        out.setdefault(name, []).append({**dict(LABEL.findall(labels or "")), "value": float(value)})
    return out


def load(port: int, stop: threading.Event) -> None:
    """Keep eight requests in flight (each about 1.3 s in the demo profile) until told to stop."""
    def one() -> None:
        with httpx.Client(timeout=30) as client:
            while not stop.is_set():
                try:
                    client.post(f"http://127.0.0.1:{port}/v1/completions",
                                json={"model": "demo", "prompt": "load", "max_tokens": 128})
                except httpx.HTTPError:
                    stop.wait(0.1)  # the server went away (the test is ending): try again or stop

    threads = [threading.Thread(target=one, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_every_family_in_the_demo_with_jobs_and_profiling(tmp_path: Path) -> None:
    daemon = DaemonProc(tmp_path, {**FAST_DEMO, "metrics": {"gpm_interval_seconds": 0.5}})
    stop = threading.Event()
    loader: threading.Thread | None = None
    try:
        daemon.start()
        job = daemon.demo_job("--gpus", "0")
        loader = threading.Thread(target=load, args=(daemon.server_port, stop), daemon=True)
        loader.start()

        def ready() -> dict[str, list[dict[str, Any]]] | None:
            got = samples(daemon)
            if not set(DCGM_FAMILIES) | set(NEW_FAMILIES) <= set(got):
                return None
            busy = [s for s in got["DCGM_FI_PROF_SM_ACTIVE"] if s["gpu"] == "3" and s["value"] > 0.05]
            return got if busy and any(s.get("hpc_job") == job for s in got["DCGM_FI_DEV_GPU_UTIL"]) else None

        got = wait_until(ready, 60, "every family, hpc_job on the job's GPU and profiling under load")
    finally:
        stop.set()
        if loader is not None:
            loader.join(60)
        text = daemon.metrics() if daemon.proc and daemon.proc.poll() is None else ""
        daemon.stop()

    for name in DCGM_FAMILIES:
        assert {s["gpu"] for s in got[name]} == {"0", "1", "2", "3"}, name
        assert all(s[DRIVER_LABEL] for s in got[name]), name
        assert all(s.get("hpc_job") == (job if s["gpu"] == "0" else None) for s in got[name]), name
    # Profiling follows the load: the server's GPUs work, a GPU nobody uses does not.
    tensor = {s["gpu"]: s["value"] for s in got["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"]}
    assert tensor["1"] == 0.0 and tensor["3"] > 0.0, tensor
    assert all(0.0 <= s["value"] <= 1.0 for s in got["DCGM_FI_PROF_SM_OCCUPANCY"])
    assert {s["gpu"] for s in got["exporter_watchdog_gpu_job_info"]} == {"0"}
    (info,) = got["exporter_watchdog_gpu_job_info"]
    assert info["hpc_job"] == job and info["partition"] == "demo" and info["user"]
    memory = {(s["gpu"], s["owner"], s["hpc_job"]): s["value"] for s in got["exporter_watchdog_gpu_memory_used_bytes"]}
    assert memory == {("0", "slurm", job): float(6 << 30), ("2", "watchdog", ""): float(20 << 30),
                      ("3", "watchdog", ""): float(20 << 30)}
    assert "hpc_job" in text  # the exposition Prometheus reads carries it as well
