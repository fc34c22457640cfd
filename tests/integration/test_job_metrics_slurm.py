"""Per-job GPU metrics beside a real slurmctld/slurmd: `hpc_job` and job info from the daemon's own job map.

Two ways NVML is missing here: faked at the backend interface (tests/support/fake_nvml_serve.py runs the
real daemon over simulated GPUs whose process list the test writes), and really failing to load (this
machine has no NVIDIA driver), where ownership must still be exported.
"""

from __future__ import annotations

import ctypes.util
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_daemon_slurm import daemon_config, held
from tests.support.daemon import DaemonProc
from tests.support.prom import REPO
from tests.support.slurm_cluster import SlurmCluster, wait_for

pytestmark = pytest.mark.slurm

FAKE_NVML = [sys.executable, "-m", "tests.support.fake_nvml_serve"]
PARTITION = "main"  # the test cluster's partition (tests/support/slurm_cluster.py)


def samples(daemon: DaemonProc, name: str) -> list[dict[str, Any]]:
    """Every sample of `name` in the daemon's /metrics, as its labels plus `value`."""
    out = []
    for family in text_string_to_metric_families(daemon.metrics()):
        for s in family.samples:
            if s.name == name:
                out.append({**s.labels, "value": s.value})
    return out


def wait_metrics(daemon: DaemonProc, check: Callable[[], bool], what: str) -> None:
    try:
        wait_for(check, 60, what, 0.2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- /metrics ---\n{daemon.metrics()[-6000:]}\n--- daemon log ---\n"
                             f"{daemon.log()[-3000:]}") from None


@pytest.fixture
def quiet(slurm_cluster: SlurmCluster) -> SlurmCluster:
    slurm_cluster.cancel_all()
    wait_for(lambda: not slurm_cluster.job_cgroup_dirs(), 60, "job cgroup dirs to go")
    return slurm_cluster


@pytest.fixture
def daemons() -> Iterator[list[DaemonProc]]:
    made: list[DaemonProc] = []
    yield made
    for daemon in made:
        daemon.stop()


def job_pid(cluster: SlurmCluster, job: str) -> int:
    """The PID of the job's batch script, which it wrote to its own file."""
    path = cluster.workdir / "out" / f"{job}.pid"
    wait_for(lambda: path.exists() and path.read_text().strip(), 60, f"job {job} to write its PID")
    return int(path.read_text())


def test_hpc_job_and_job_info_on_a_real_jobs_gpus(
    quiet: SlurmCluster, daemons: list[DaemonProc], tmp_path: Path
) -> None:
    procs_file = tmp_path / "gpu-processes.json"
    procs_file.write_text("{}")
    daemon = DaemonProc(tmp_path, daemon_config(quiet.node), demo=False,
                        env={"SLURM_CONF": str(quiet.conf), "PYTHONPATH": str(REPO)},
                        exe=[*FAKE_NVML, "--gpu-processes", str(procs_file)])
    daemons.append(daemon)
    daemon.start(wait_state="serving", timeout=90)
    claimed = set(daemon.status()["claimed_gpus"])  # type: ignore[index]

    pid_file = quiet.workdir / "out" / "$SLURM_JOB_ID.pid"
    job = quiet.sbatch(1, command=f"echo $$ > {pid_file}; exec sleep 300")
    quiet.wait_job_running(job)
    (gpu,) = held(quiet, job)
    assert gpu not in claimed, "Slurm put the job on the server's GPUs; the premise fails"
    pid = job_pid(quiet, job)
    # NVML (faked) lists the job's real process on its GPU: 3 GiB, plus 1 GiB of a second one of its PIDs
    # above the kernel's pid_max (a PID we cannot see counts as foreign, never as the job's).
    procs_file.write_text(json.dumps({str(gpu): [[pid, 3 << 30], [(1 << 22) + 7, 1 << 30]]}))

    def labelled() -> bool:
        return any(s.get("hpc_job") == job for s in samples(daemon, "DCGM_FI_DEV_GPU_UTIL"))

    wait_metrics(daemon, labelled, f"hpc_job={job} on DCGM_FI_DEV_GPU_UTIL")
    for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE"):
        by_gpu = {s["gpu"]: s.get("hpc_job") for s in samples(daemon, name)}
        # The job's GPU carries its id; GPUs no job holds carry no hpc_job label at all, as in dcgm-exporter.
        assert by_gpu == {str(g): (job if g == gpu else None) for g in range(4)}, name

    info = samples(daemon, "exporter_watchdog_gpu_job_info")
    assert info == [{"gpu": str(gpu), "hpc_job": job, "user": "root", "partition": PARTITION, "value": 1.0}]
    memory = {(s["gpu"], s["owner"], s["hpc_job"]): s["value"]
              for s in samples(daemon, "exporter_watchdog_gpu_memory_used_bytes")}
    assert memory == {(str(gpu), "slurm", job): float(3 << 30), (str(gpu), "foreign", ""): float(1 << 30)}
    owners = {s["gpu"]: s["owner"] for s in samples(daemon, "exporter_watchdog_gpu_owner") if s["value"] == 1}
    assert owners[str(gpu)] == "slurm" and all(owners[str(g)] == "watchdog" for g in claimed)

    quiet.cancel(job)
    procs_file.write_text("{}")
    wait_metrics(daemon, lambda: not samples(daemon, "exporter_watchdog_gpu_job_info"), "job info to go")
    # The GPU families come from a pass cached for metrics.gpu_cache_seconds: the label goes with the next one.
    wait_metrics(daemon, lambda: all("hpc_job" not in s for s in samples(daemon, "DCGM_FI_DEV_GPU_UTIL")),
                 "hpc_job to go with the job")


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="NVML loads on this machine")
def test_owners_without_nvml_come_from_node_gpus_and_the_daemons_state(
    quiet: SlurmCluster, daemons: list[DaemonProc], tmp_path: Path
) -> None:
    daemon = DaemonProc(tmp_path, daemon_config(quiet.node), demo=False, env={"SLURM_CONF": str(quiet.conf)})
    daemons.append(daemon)
    daemon.start(wait_state="serving", timeout=90)
    assert "NVML" in daemon.log()  # it says why it has no hardware view
    claimed = set(daemon.status()["claimed_gpus"])  # type: ignore[index]
    job = quiet.sbatch(1)
    quiet.wait_job_running(job)
    (gpu,) = held(quiet, job)

    def owners() -> dict[str, str]:
        return {s["gpu"]: s["owner"] for s in samples(daemon, "exporter_watchdog_gpu_owner") if s["value"] == 1}

    expected = {str(g): "slurm" if g == gpu else "watchdog" if g in claimed else "free" for g in range(4)}
    wait_metrics(daemon, lambda: owners() == expected, f"owners {expected}")
    assert {s["gpu"]: s["value"] for s in samples(daemon, "exporter_watchdog_gpu_up")} == {
        str(g): 0.0 for g in range(4)}  # the hardware view is missing, and says so
    assert samples(daemon, "exporter_watchdog_gpu_job_info") == [
        {"gpu": str(gpu), "hpc_job": job, "user": "root", "partition": PARTITION, "value": 1.0}]
    assert samples(daemon, "DCGM_FI_DEV_GPU_UTIL") == []
