"""`slurm.detect: squeue` beside a real Slurm configured like a container (proctrack/linuxproc, task/none).

Such a Slurm makes no job cgroups, so the cgroup watcher would see nothing: the daemon learns of
jobs from `squeue -w NODE` alone (no Prolog installed here, to show this signal on its own).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProc, group_alive
from tests.support.slurm_cluster import CGROUP_ROOT, SlurmCluster, wait_for

pytestmark = pytest.mark.slurm

INTERVAL = 0.5
SLURM_TIMEOUT = 2.0
COOLDOWN = 1.0


def daemon_config(node: str) -> dict[str, Any]:
    return {
        "node": {"name": node, "gpus": 4},
        "claim": {"gpus": 2, "cooldown_seconds": COOLDOWN},
        "server": {"profile": "demo", "backoff_initial_seconds": 0.5},
        "slurm": {"detect": "squeue", "squeue_interval_seconds": INTERVAL, "timeout_seconds": SLURM_TIMEOUT,
                  "rescan_seconds": 1.0},
    }


@pytest.fixture
def pod_like(slurm_cluster_factory: Callable[..., SlurmCluster]) -> SlurmCluster:
    return slurm_cluster_factory(no_cgroups=True)


@pytest.fixture
def daemon(tmp_path: Path, pod_like: SlurmCluster) -> Iterator[DaemonProc]:
    proc = DaemonProc(tmp_path, daemon_config(pod_like.node), demo=False, env={"SLURM_CONF": str(pod_like.conf)})
    try:
        yield proc
    finally:
        record = proc.server_record()
        proc.stop()
        if record:
            assert not group_alive(int(record["pgid"])), "the server outlived its daemon"


def gpus_of(cluster: SlurmCluster, job: str) -> set[int]:
    detail = cluster.job_gres(job)[cluster.node]
    found: set[int] = set()
    for part in detail.split("IDX:")[1].rstrip(")").split(","):
        lo, _, hi = part.partition("-")
        found.update(range(int(lo), int(hi or lo) + 1))
    return found


def listed(doc: dict[str, Any], job: str) -> dict[str, Any] | None:
    return next((j for j in doc["jobs"] if j["job_id"] == job), None)


def no_job_cgroups(node: str) -> bool:
    """Slurm made no job directory for the node under any cgroup controller."""
    return not any(CGROUP_ROOT.glob(f"*/slurm_{node}/uid_*/job_*")) and not any(
        CGROUP_ROOT.glob(f"**/*{node}*slurmstepd.scope/job_*"))


def test_jobs_listed_by_squeue_make_the_daemon_yield_only_on_our_gpus_and_fail_safe(
    pod_like: SlurmCluster, daemon: DaemonProc,
) -> None:
    daemon.start(wait_state="serving", timeout=90)
    first = daemon.status()
    assert first is not None and first["claimed_gpus"] == [2, 3]

    # A job on a GPU that is not ours: listed with its GPU, the server keeps running.
    other = pod_like.sbatch(1)
    pod_like.wait_job_running(other)
    doc = daemon.wait_status(lambda d: listed(d, other) is not None, 60, f"job {other} listed")
    assert listed(doc, other) == {"job_id": other, "gpus": sorted(gpus_of(pod_like, other)), "source": "squeue"}
    assert doc["server_pid"] == first["server_pid"] and doc["state"] == "serving"
    assert no_job_cgroups(pod_like.node), "Slurm made job cgroups: not configured like a pod"

    # A job on our GPUs: the server goes, seen through squeue alone.
    t0 = time.monotonic()
    overlapping = pod_like.sbatch(3)
    doc = daemon.wait_status(lambda d: d["server_pid"] is None, 60, "the server to stop")
    yielded_after = time.monotonic() - t0
    assert gpus_of(pod_like, overlapping) & {2, 3}, "the job does not overlap; premise fails"
    assert not group_alive(first["server_pid"])
    assert doc["last_yield"]["reason"] == "job" and doc["last_yield"]["jobs"] == [overlapping]
    print(f"\nsqueue mode, interval {INTERVAL} s: sbatch to server gone in {yielded_after:.2f} s")

    pod_like.cancel(overlapping)
    doc = daemon.wait_state("serving", 60)
    assert not set(doc["claimed_gpus"]) & gpus_of(pod_like, other)
    assert 'exporter_watchdog_yields_total{reason="job"} 1.0' in daemon.metrics()
    assert "exporter_watchdog_slurm_jobs 1.0" in daemon.metrics()

    # Slurm cannot be asked: every GPU counts as held until squeue answers again.
    serving_pid = doc["server_pid"]
    pod_like.stop_slurmctld()
    try:
        doc = daemon.wait_status(lambda d: d["server_pid"] is None, 60, "the fail-safe yield")
        assert doc["last_yield"]["reason"] == "slurm_unknown"
        assert listed(doc, "slurm-unreachable") == {"job_id": "slurm-unreachable", "gpus": None, "source": "squeue"}
        assert not group_alive(serving_pid)
    finally:
        pod_like.start_slurmctld()
    doc = daemon.wait_state("serving", 90)
    assert listed(doc, "slurm-unreachable") is None and listed(doc, other) is not None
    wait_for(lambda: "squeue answers again" in daemon.log(), 30, "the recovery log line")
