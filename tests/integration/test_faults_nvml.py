"""Fault table, NVML failing in the middle of a run: for one GPU, then for all, then healed, on a real
`serve --demo` daemon whose simulated GPUs (the GpuBackend stand-in for NVML) are told to fail by
`exporter-watchdog demo fault nvml`. Every scrape stays 200, the loop's heartbeat fresh, yields happen."""

from __future__ import annotations

import os
import re
import select
import time

from prometheus_client.parser import text_string_to_metric_families

from exporter_watchdog.demo.node import DemoNode
from tests.support.daemon import DaemonProc, wait_until
from tests.support.procstat import heartbeat_age

HEARTBEAT_BOUND = 15.0  # the loop wakes at least every 5 s (slurm.rescan_seconds); generous for a busy machine


def scrape(daemon: DaemonProc) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """GET /metrics, asserting 200 and a parseable exposition; family name -> labels -> value."""
    import httpx

    response = httpx.get(f"{daemon.url}/metrics", timeout=30)
    assert response.status_code == 200, response.text[:500]
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def per_gpu(metrics: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str) -> dict[str, float]:
    return {dict(labels)["gpu"]: value for labels, value in metrics.get(name, {}).items()}


def up(daemon: DaemonProc) -> dict[str, float]:
    return per_gpu(scrape(daemon), "exporter_watchdog_gpu_up")


def fault(daemon: DaemonProc, *args: str) -> str:
    return daemon.cli("demo", "fault", "nvml", *args, check=True).stdout


def assert_yields_on_time(daemon: DaemonProc) -> float:
    """A job on a claimed GPU stops the server; returns the seconds from the job to the server's exit."""
    doc = daemon.wait_state("serving", 60)
    node = DemoNode(daemon.state_dir / "demo-node", "demo-node", 4)  # as `demo job` does, without its start-up
    fd = os.pidfd_open(doc["server_pid"])
    try:
        t0 = time.monotonic()
        job = node.submit(gpus=[doc["claimed_gpus"][-1]])
        assert select.select([fd], [], [], 60)[0], "the server did not stop for the job"
        took = time.monotonic() - t0
    finally:
        os.close(fd)
    node.cancel(job.job_id)
    return took


def scrapes_stay_200(daemon: DaemonProc, count: int = 20) -> None:
    for _ in range(count):
        scrape(daemon)
    assert heartbeat_age(f"{daemon.url}/metrics") < HEARTBEAT_BOUND


def test_nvml_failing_for_one_gpu_then_all_then_healed(daemon: DaemonProc) -> None:
    daemon.start()
    assert up(daemon) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}
    errors_before = scrape(daemon)["exporter_watchdog_gpu_collect_errors_total"][()]

    # One GPU fails (an NVML error on every call): only its own series go.
    assert "GPU(s) 3" in fault(daemon, "--gpu", "3")
    wait_until(lambda: up(daemon) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 0.0}, 10, "GPU 3 down, the rest up")
    metrics = scrape(daemon)
    assert set(per_gpu(metrics, "DCGM_FI_DEV_GPU_UTIL")) == {"0", "1", "2"}
    assert per_gpu(metrics, "exporter_watchdog_gpu_lost")["3"] == 0.0
    assert metrics["exporter_watchdog_gpu_collect_errors_total"][()] > errors_before
    scrapes_stay_200(daemon)
    one_gpu = assert_yields_on_time(daemon)

    # Every GPU fails: no DCGM series at all, the daemon's own families and the GPU health still there.
    fault(daemon, "--gpu", "all")
    wait_until(lambda: up(daemon) == {"0": 0.0, "1": 0.0, "2": 0.0, "3": 0.0}, 10, "every GPU down")
    metrics = scrape(daemon)
    assert not any(name.startswith("DCGM_FI_") for name in metrics), sorted(metrics)
    assert "exporter_watchdog_loop_heartbeat_age_seconds" in metrics and "exporter_watchdog_gpu_owner" in metrics
    scrapes_stay_200(daemon)
    all_gpus = assert_yields_on_time(daemon)

    # Fallen off the bus: marked lost.
    fault(daemon, "--gpu", "2", "--kind", "lost")
    wait_until(lambda: per_gpu(scrape(daemon), "exporter_watchdog_gpu_lost").get("2") == 1.0, 10, "GPU 2 lost")
    assert up(daemon) == {"0": 1.0, "1": 1.0, "2": 0.0, "3": 1.0}
    scrapes_stay_200(daemon)

    # Healed: every GPU readable again, and the daemon still serves and yields.
    assert "works again" in fault(daemon, "--gpu", "off")
    wait_until(lambda: up(daemon) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}, 10, "every GPU up again")
    assert set(per_gpu(scrape(daemon), "DCGM_FI_DEV_GPU_UTIL")) == {"0", "1", "2", "3"}
    healed = assert_yields_on_time(daemon)
    log = daemon.log()
    assert re.search(r"GPU 3: .*Unknown Error", log) and "GPU 2: lost: " in log and "readable again" in log
    print(f"NVML faults: yield {one_gpu * 1000:.0f} ms with GPU 3 failing, {all_gpus * 1000:.0f} ms with all "
          f"failing, {healed * 1000:.0f} ms healed")


def test_fault_command_checks_its_arguments(daemon: DaemonProc) -> None:
    result = daemon.cli("demo", "fault", "nvml", "--gpu", "1")
    assert result.returncode == 2 and "no demo node at" in result.stderr  # nothing runs yet
    daemon.start()
    for bad in ("4", "-1", "two"):
        result = daemon.cli("demo", "fault", "nvml", "--gpu", bad)
        assert result.returncode == 2 and f"--gpu '{bad}': expected a GPU index 0-3, all or off" in result.stderr
    assert up(daemon) == {"0": 1.0, "1": 1.0, "2": 1.0, "3": 1.0}
