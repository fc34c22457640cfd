"""Fault table, Slurm: scontrol hanging past the timeout and scontrol printing garbage, against a real
slurmctld/slurmd (slurmctld stopped outright: test_daemon_slurm.py, the fail-safe test).

scontrol is the real one behind a small wrapper that a file switches into a fault: `hang` (sleeps far
past slurm.timeout_seconds) or `garbage` (prints nonsense, exit 0). Each fault must give a fail-safe
yield counted as a query error, and the daemon must serve again once scontrol answers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.integration.test_daemon_slurm import COOLDOWN, SLURM_TIMEOUT, daemon_config, held, metric
from tests.support.daemon import DaemonProc, group_alive
from tests.support.slurm_cluster import SlurmCluster, wait_for

pytestmark = pytest.mark.slurm

WRAPPER = """#!/bin/sh
# scontrol with a fault switched on by the file {mode}: hang, garbage, or (empty) the real thing.
case "$(cat {mode} 2>/dev/null)" in
  hang) exec sleep 3600 ;;
  garbage) printf 'JobId=%s <<not scontrol>> TRES=gpu:(IDX:?) \\001\\377\\n' "$5"; exit 0 ;;
esac
exec scontrol "$@"
"""


@pytest.mark.parametrize("fault", ["hang", "garbage"])
def test_scontrol_faults_give_a_fail_safe_yield_counted_as_errors_and_recovery(
    tmp_path: Path, slurm_cluster: SlurmCluster, fault: str,
) -> None:
    cluster = slurm_cluster
    cluster.cancel_all()
    wait_for(lambda: not cluster.job_cgroup_dirs(), 60, "job cgroup dirs to go")
    mode = tmp_path / "mode"
    mode.write_text("")
    wrapper = tmp_path / "scontrol"
    wrapper.write_text(WRAPPER.format(mode=mode))
    wrapper.chmod(0o755)
    config = daemon_config(cluster.node)
    config["slurm"]["scontrol"] = [str(wrapper)]
    folder = tmp_path / "daemon"
    folder.mkdir()
    daemon = DaemonProc(folder, config, demo=False, env={"SLURM_CONF": str(cluster.conf)})
    try:
        first = daemon.start(timeout=90).status()
        assert first is not None
        errors_before = metric(daemon, "exporter_watchdog_slurm_query_errors_total")

        mode.write_text(fault)
        job = cluster.sbatch(1)  # Slurm gives it a low GPU, not one of ours: only the fault makes us yield
        cluster.wait_job_cgroup(job)
        doc = daemon.wait_status(lambda d: d["server_pid"] is None, 60, f"the fail-safe yield ({fault})")
        assert not group_alive(first["server_pid"])
        assert doc["last_yield"]["reason"] == "slurm_unknown" and doc["last_yield"]["jobs"] == [job]
        wait_for(lambda: metric(daemon, "exporter_watchdog_slurm_query_errors_total") > errors_before, 30,
                 "the query error counted")
        if fault == "hang":
            assert f"scontrol timed out after {SLURM_TIMEOUT:g} s" in daemon.log()
        else:
            assert "unreadable scontrol output" in daemon.log()

        mode.write_text("")  # Slurm answers again: the job holds another GPU, so we serve beside it
        doc = daemon.wait_status(lambda d: d["state"] == "serving" and d["server_ready"], 60 + COOLDOWN,
                                 "serving again once scontrol answers")
        gpus = held(cluster, job)
        assert not set(doc["claimed_gpus"]) & gpus
        assert any(j["job_id"] == job and j["gpus"] == sorted(gpus) for j in doc["jobs"])
    finally:
        mode.write_text("")
        daemon.stop()
        cluster.cancel_all()
