"""`exporter-watchdog prolog` installed as a real slurmd's Prolog: the job's first instruction runs after
our server is gone, a job on other GPUs is not held up, and without a daemon the node keeps working."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import DaemonProc, group_alive, pid_alive
from tests.support.slurm_cluster import CGROUP_ROOT, SlurmCluster, unique_name
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slurm

# Contain implies Alloc: slurmd runs the Prolog at allocation, with SLURM_JOB_GPUS set, and starts the
# batch step (and makes the job's cgroup) only after it has returned. Alloc alone behaves the same here.
PROLOG_FLAGS = "Contain"


def daemon_config(node: str) -> dict[str, Any]:
    """Four GPUs, two claimed, the demo profile, real job cgroups."""
    return {
        "node": {"name": node, "gpus": 4},
        "claim": {"gpus": 2, "cooldown_seconds": 1.0},
        "server": {"profile": "demo", "backoff_initial_seconds": 0.5},
        "slurm": {"cgroup_root": str(CGROUP_ROOT), "timeout_seconds": 2.0, "rescan_seconds": 1.0},
    }


def prolog_command(config: Path, log: Path) -> str:
    """The Prolog as a site installs it, its exit status appended to `log` so the test can check it."""
    cmd = f"{sys.executable} -m exporter_watchdog.cli prolog --config {config} --log {log}"
    return f"sh -c '{cmd}; rc=$?; echo \"job $SLURM_JOB_ID: prolog exit $rc\" >> {log}; exit $rc'"


def job_command(out: Path, server_pid: int | None) -> str:
    """A job whose first instruction records whether the server's PID is alive, then its GPUs; it then sleeps."""
    check = ""
    if server_pid is not None:
        # A zombie (Z) or dead (X) process counts as gone: it holds no GPU memory any more.
        check = (f"st=$(sed -n 's/^State:[[:space:]]*//p' /proc/{server_pid}/status 2>/dev/null); "
                 f'case "$st" in ""|Z*|X*) r=gone;; *) r="alive $st";; esac; '
                 f'echo "$r" > {out}/$SLURM_JOB_ID.server; ')
    return f'{check}echo "$SLURM_JOB_GPUS" > {out}/$SLURM_JOB_ID.gpus; exec sleep 300'


@dataclass
class Setup:
    """A one-node cluster with the Prolog installed, and a daemon (not started) the Prolog talks to."""

    cluster: SlurmCluster
    daemon: DaemonProc
    prolog_log: Path

    @property
    def out(self) -> Path:
        return self.cluster.workdir / "out"

    def read(self, job: str, what: str) -> str:
        """What the job wrote first thing (`server` or `gpus`), once it has."""
        path = self.out / f"{job}.{what}"
        wait_for(lambda: path.exists() and path.read_text().endswith("\n"), 60, f"job {job} to write {what}")
        return path.read_text().strip()

    def gpus(self, job: str) -> set[int]:
        return {int(g) for g in self.read(job, "gpus").split(",") if g}

    def prolog_lines(self, job: str) -> list[str]:
        """The Prolog's log lines about `job`, once it has logged its exit status."""
        def lines() -> list[str]:
            text = self.prolog_log.read_text() if self.prolog_log.exists() else ""
            found = [line for line in text.splitlines() if f"job {job}:" in line]
            return found if any("prolog exit" in line for line in found) else []

        return wait_for(lines, 60, f"the Prolog of job {job} to finish")


@pytest.fixture
def setup(tmp_path: Path, slurm_cluster_factory: Callable[..., SlurmCluster]) -> Iterator[Setup]:
    node = unique_name("wdp")
    folder = tmp_path / "d"
    folder.mkdir()
    daemon = DaemonProc(folder, daemon_config(node), demo=False)
    prolog_log = tmp_path / "prolog.log"
    cluster = slurm_cluster_factory(node=node, prolog=prolog_command(daemon.config_path, prolog_log),
                                    prolog_flags=PROLOG_FLAGS)
    daemon.env["SLURM_CONF"] = str(cluster.conf)
    try:
        yield Setup(cluster, daemon, prolog_log)
    finally:
        record = daemon.server_record()
        daemon.stop()
        if record:
            assert not group_alive(int(record["pgid"])), "the server outlived its daemon"


def settled_state(cluster: SlurmCluster) -> str | None:
    """The node's state once no job is on it any more (idle, drained, down, ...); None before."""
    state = cluster.run(["sinfo", "-h", "-o", "%T"]).stdout.strip()
    return None if state in ("allocated", "mixed", "completing") else state


def exit_status(lines: list[str]) -> int:
    match = re.search(r"prolog exit (\d+)", "\n".join(lines))
    assert match, lines
    return int(match.group(1))


def test_job_on_our_gpu_finds_the_server_gone_at_its_first_instruction(setup: Setup) -> None:
    cluster, daemon = setup.cluster, setup.daemon
    first = daemon.start(timeout=90).status()
    assert first is not None and first["claimed_gpus"] == [2, 3]
    pid = first["server_pid"]

    # Slurm hands out the lowest free GPUs: fill 0 and 1, so the next one-GPU job gets one of ours.
    filler = cluster.sbatch(2, command=job_command(setup.out, None))
    assert setup.gpus(filler) == {0, 1}
    job = cluster.sbatch(1, command=job_command(setup.out, pid))

    assert setup.read(job, "server") == "gone"
    taken = setup.gpus(job)
    assert taken & set(first["claimed_gpus"]), f"the job got GPUs {taken}, none of ours; the premise fails"
    assert not pid_alive(pid) and not group_alive(pid)
    lines = setup.prolog_lines(job)
    assert exit_status(lines) == 0
    doc = daemon.wait_status(lambda d: d["last_yield"] is not None, 30, "the yield in the status")
    assert doc["last_yield"]["jobs"] == [job]
    # With PrologFlags=Contain the job's cgroup exists before its Prolog runs: on a loaded machine the
    # daemon may yield to the cgroup first, and the Prolog then finds the GPUs no longer ours. Either
    # way the yield is to this job and the server was gone at its first instruction (asserted above).
    if doc["last_yield"]["reason"] == "prolog":
        assert any(f"GPUs {sorted(taken)} released, the server is gone" in line for line in lines), lines
    else:
        assert doc["last_yield"]["reason"] == "job", doc["last_yield"]
        assert any(f"GPUs {sorted(taken)} were not ours" in line for line in lines), lines
    assert cluster.job_state(job) == "RUNNING"

    # The job's GPU stays the job's: with one GPU free the daemon stays off until the job ends.
    cluster.cancel(job)
    doc = daemon.wait_state("serving", 90)
    assert doc["claimed_gpus"] == [2, 3] and doc["server_pid"] != pid


def test_job_on_other_gpus_is_not_held_and_the_server_stays(setup: Setup) -> None:
    cluster, daemon = setup.cluster, setup.daemon
    first = daemon.start(timeout=90).status()
    assert first is not None and first["claimed_gpus"] == [2, 3]
    pid = first["server_pid"]

    job = cluster.sbatch(2, command=job_command(setup.out, pid))
    assert setup.read(job, "server").startswith("alive")
    assert setup.gpus(job) == {0, 1}
    lines = setup.prolog_lines(job)
    assert any("GPUs [0, 1] were not ours" in line for line in lines), lines
    assert exit_status(lines) == 0
    print("\n".join(lines))
    # The daemon sees the job's cgroup, learns its GPUs from Slurm, and keeps the same server.
    doc = daemon.wait_status(lambda d: any(j["job_id"] == job and j["gpus"] == [0, 1] for j in d["jobs"]),
                             60, f"job {job} in the status")
    assert doc["state"] == "serving" and doc["server_pid"] == pid and doc["last_yield"] is None
    assert pid_alive(pid)


def test_without_a_daemon_the_prolog_returns_and_the_node_stays_up(setup: Setup) -> None:
    cluster = setup.cluster
    assert setup.daemon.status() is None
    job = cluster.sbatch(1, command=f'echo "$SLURM_JOB_GPUS" > {setup.out}/$SLURM_JOB_ID.gpus')
    assert cluster.wait_job_done(job) == "COMPLETED"
    assert setup.gpus(job) == {0}
    lines = setup.prolog_lines(job)
    assert any("no daemon is running" in line for line in lines), lines
    assert exit_status(lines) == 0
    # A failing Prolog would drain the node; it must go back to idle.
    assert wait_for(lambda: settled_state(cluster), 60, "the node to settle") == "idle"
