"""Fault table, races and reloads: SIGHUP with an invalid file while serving, `switch` during a yield,
a Prolog racing its job's cgroup event. A real `serve --demo` daemon, real inotify."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import DaemonProc, group_alive, pid_alive, wait_until
from tests.support.faults import fault_daemon, run_prolog, server_pids, write_profile


def counter(daemon: DaemonProc, name: str) -> float:
    """The sum of a counter's samples over all labels."""
    total = 0.0
    for family in text_string_to_metric_families(daemon.metrics()):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def test_sighup_with_an_invalid_file_keeps_the_server_and_its_yields(daemon: DaemonProc) -> None:
    pid = daemon.start().status()["server_pid"]  # type: ignore[index]
    good = daemon.config_path.read_text()
    daemon.config_path.write_text("claim:\n  gpus: [\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "config not reloaded" in daemon.log(), 30, "the reload error in the log")
    assert str(daemon.config_path) in daemon.log().split("config not reloaded", 1)[1].splitlines()[0]
    doc = daemon.status()
    assert doc is not None and doc["state"] == "serving" and doc["server_pid"] == pid, "no restart on a bad file"
    daemon.config_path.write_text(good)
    daemon.demo_job("--gpus", "3")  # yields still work with the old config
    wait_until(lambda: not group_alive(pid), 30, "the yield after the failed reload")


def test_switch_during_a_yield_serves_the_new_profile_off_the_jobs_gpus(tmp_path: Path) -> None:
    term = tmp_path / "term"
    daemon = fault_daemon(tmp_path, "--ignore-term", "--term-file", str(term),
                          config={"server": {"stop_timeout_seconds": 3.0}})
    write_profile(tmp_path / "models", "calm", tmp_path / "calm-pids.json")
    try:
        daemon.start()
        old = server_pids(tmp_path)
        daemon.demo_job("--gpus", "3")
        wait_until(term.exists, 30, "the yield's SIGTERM (ignored: the stop takes 3 s)")
        switched = daemon.cli("switch", "calm", check=True)
        assert "calm" in switched.stdout + switched.stderr
        wait_until(lambda: not any(pid_alive(p) for p in old), 30, "the old server killed at the stop deadline")
        doc = daemon.wait_status(lambda d: d["profile"] == "calm" and d["state"] == "serving" and d["server_ready"],
                                 60, "serving the switched profile")
        assert 3 not in doc["claimed_gpus"]
        assert doc["last_yield"]["reason"] == "job"
        assert not any(pid_alive(p) for p in old)
    finally:
        daemon.stop()


def test_a_prolog_racing_its_jobs_cgroup_event_yields_once_and_returns_with_the_server_gone(
    daemon: DaemonProc,
) -> None:
    daemon.start()
    jobs_dir = daemon.state_dir / "demo-node" / "jobs"
    rounds = 4
    for n in range(rounds):
        doc = daemon.wait_status(lambda d: d["state"] == "serving" and d["server_ready"], 60, "serving")
        pid, target = doc["server_pid"], str(max(doc["claimed_gpus"]))
        counter_file = jobs_dir / ".next"
        job = counter_file.read_text().strip() if counter_file.exists() else "1"
        results: dict[str, object] = {}
        # The job's cgroup (inotify) and its Prolog (control socket) reach the daemon at the same time.
        submit = threading.Thread(target=lambda r=results, g=target: r.update(
            job=daemon.demo_job("--gpus", g, "--seconds", "3")))
        submit.start()
        result, _ = run_prolog(daemon, target, job)
        gone_at_return = not group_alive(pid)
        submit.join(60)
        assert results.get("job") == job, results
        assert result.returncode == 0, result.stderr
        assert gone_at_return, f"round {n}: the Prolog returned with the server alive: {result.stderr}"
    # One conflict and one yield per job, whichever signal came first.
    wait_until(lambda: counter(daemon, "exporter_watchdog_job_conflicts_total") == rounds, 30,
               f"{rounds} conflicts counted")
    assert counter(daemon, "exporter_watchdog_yields_total") == rounds
