"""The daemon end to end on the embedded demo node: real subprocesses, real inotify, the real stub server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import httpx

from tests.support.daemon import EXE, FAST_DEMO, DaemonProc, group_alive, pid_alive, wait_until


def test_claims_highest_gpus_yields_to_a_job_and_comes_back(daemon: DaemonProc) -> None:
    doc = daemon.start().status()
    assert doc is not None
    assert doc["claimed_gpus"] == [2, 3] and doc["profile"] == "demo" and doc["state"] == "serving"
    first_pid = doc["server_pid"]
    assert pid_alive(first_pid)
    models = httpx.get(f"http://127.0.0.1:{daemon.server_port}/v1/models", timeout=5).json()
    assert models["data"][0]["id"] == "demo"

    # A job on GPUs we do not hold changes nothing.
    other = daemon.demo_job("--gpus", "0", "--seconds", "0")
    daemon.wait_status(lambda d: any(j["job_id"] == other for j in d["jobs"]), 10, "job seen")
    doc = daemon.status()
    assert doc and doc["state"] == "serving" and doc["server_pid"] == first_pid
    daemon.cli("demo", "job", "--cancel", other, check=True)

    # A job on a claimed GPU: the server's whole process group is gone.
    job = daemon.demo_job("--gpus", "3", "--seconds", "0")
    doc = daemon.wait_status(lambda d: d["server_pid"] is None, 10, "the server to stop")
    assert not pid_alive(first_pid) and not group_alive(first_pid)
    assert doc["last_yield"]["reason"] == "job" and doc["last_yield"]["jobs"] == [job]
    assert doc["gpu_owner"]["3"] == "slurm"

    # GPUs 0-2 are free: after the cool-down it takes the highest two of them.
    doc = daemon.wait_state("serving", 30)
    assert doc["claimed_gpus"] == [1, 2] and doc["server_pid"] != first_pid
    daemon.cli("demo", "job", "--cancel", job, check=True)

    text = daemon.metrics()
    assert 'exporter_watchdog_yields_total{reason="job"} 1.0' in text
    assert "exporter_watchdog_job_conflicts_total 1.0" in text
    assert 'exporter_watchdog_state{state="serving"} 1.0' in text


def test_stays_off_while_too_few_gpus_are_free(daemon: DaemonProc) -> None:
    daemon.start()
    job = daemon.demo_job("--gpus", "0-2", "--seconds", "0")
    daemon.wait_state("idle", 10)
    # Only GPU 3 is free: claiming 2, it must not start. Watch it stay off for a while.
    for _ in range(20):
        doc = daemon.status()
        assert doc is not None and doc["server_pid"] is None and doc["state"] == "idle"
        wait_until(lambda: True, 0.1, "tick")
    daemon.cli("demo", "job", "--cancel", job, check=True)
    doc = daemon.wait_state("serving", 30)
    assert doc["claimed_gpus"] == [2, 3]


def test_cpu_only_job_and_timed_job(daemon: DaemonProc) -> None:
    pid = daemon.start().status()["server_pid"]  # type: ignore[index]
    cpu = daemon.demo_job("--seconds", "0")
    daemon.wait_status(lambda d: any(j["job_id"] == cpu and j["gpus"] == [] for j in d["jobs"]), 10, "cpu job")
    assert daemon.status()["server_pid"] == pid  # type: ignore[index]
    daemon.demo_job("--gpus", "2", "--seconds", "1")
    daemon.wait_status(lambda d: d["server_pid"] is None, 10, "yield")
    # The timed job ends by itself; the daemon serves again.
    daemon.wait_state("serving", 30)


def test_status_cli_json_and_text(daemon: DaemonProc) -> None:
    daemon.start()
    result = daemon.cli("status", "--json", check=True)
    import json

    doc = json.loads(result.stdout)
    for key in ("state", "claimed_gpus", "profile", "server_pid"):
        assert key in doc
    text = daemon.cli("status", check=True).stdout
    assert "state:       serving" in text and "claimed:     2,3" in text and "profile:     demo" in text


def test_switch_restarts_server_on_new_profile_without_restarting_daemon(daemon: DaemonProc, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    demo = (Path(__file__).resolve().parents[2] / "models" / "demo.yaml").read_text()
    (models / "demo.yaml").write_text(demo)
    slow = re.sub(r"^name: demo$", "name: demo-slow", demo, flags=re.M)
    slow = re.sub(r"^served_model_name: demo$", "served_model_name: demo-slow", slow, flags=re.M)
    (models / "demo-slow.yaml").write_text(slow.replace('"--ttft-ms", "50"', '"--ttft-ms", "200"'))
    daemon.rewrite_config(server={"models_dir": str(models)})
    first = daemon.start().status()
    assert first is not None
    daemon_pid = daemon.proc.pid  # type: ignore[union-attr]

    listing = daemon.cli("models", check=True).stdout
    assert "* demo " in listing and "  demo-slow " in listing

    result = daemon.cli("switch", "demo-slow", check=True)
    assert "switched to demo-slow" in result.stdout
    doc = daemon.wait_status(lambda d: d["profile"] == "demo-slow" and d["server_ready"], 30, "switch")
    assert doc["server_pid"] != first["server_pid"] and not pid_alive(first["server_pid"])
    assert daemon.proc is not None and daemon.proc.pid == daemon_pid and daemon.proc.poll() is None
    models_out = httpx.get(f"http://127.0.0.1:{daemon.server_port}/v1/models", timeout=5).json()
    assert models_out["data"][0]["id"] == "demo-slow"
    assert "* demo-slow" in daemon.cli("models", check=True).stdout

    bad = daemon.cli("switch", "no-such-profile")
    assert bad.returncode == 2 and "no profile 'no-such-profile'" in bad.stderr

    # Kept across restarts.
    daemon.stop()
    doc = daemon.start().status()
    assert doc is not None and doc["profile"] == "demo-slow"


def test_sigterm_stops_server_and_exits_zero(daemon: DaemonProc) -> None:
    pid = daemon.start().status()["server_pid"]  # type: ignore[index]
    daemon.signal(signal.SIGTERM)
    assert daemon.wait_exit(60) == 0
    assert not group_alive(pid)
    assert not (daemon.state_dir / "control.sock").exists()


def test_sigint_also_exits_zero(daemon: DaemonProc) -> None:
    pid = daemon.start().status()["server_pid"]  # type: ignore[index]
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit(60) == 0
    assert not group_alive(pid)


def test_sighup_reloads_config(daemon: DaemonProc) -> None:
    daemon.start()
    daemon.rewrite_config(claim={"gpus": 1})
    daemon.signal(signal.SIGHUP)
    doc = daemon.wait_status(lambda d: d["claimed_gpus"] == [3] and d["server_ready"], 30, "reload to claim 1 GPU")
    assert doc["state"] == "serving"
    # A bad config on SIGHUP is logged and the old one kept.
    daemon.config_path.write_text("claim:\n  gpus: many\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "config not reloaded" in daemon.log(), 10, "reload error in the log")
    assert daemon.status()["state"] == "serving"  # type: ignore[index]


def test_config_error_exits_2_and_starts_nothing(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    state = tmp_path / "state"
    config.write_text(f"state_dir: {state}\nclaim:\n  gpus: -1\n")
    result = subprocess.run([*EXE, "serve", "--demo", "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"{config}: claim.gpus = -1: must be >= 1" in result.stderr
    assert not (state / "control.sock").exists() and not (state / "server.json").exists()


def test_unknown_profile_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nserver:\n  profile: nope\n")
    result = subprocess.run([*EXE, "serve", "--demo", "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "server.profile = 'nope'" in result.stderr


def test_check_prints_exact_command_lines(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nnode:\n  gpus: 4\nclaim:\n  gpus: 2\n"
                      "server:\n  profile: glm-4.7-flash\n")
    result = subprocess.run([*EXE, "check", "--config", str(config)], capture_output=True, text=True, timeout=60)
    # The FP8 profiles cannot run on a node without CUDA 12.8, but they are not the active one.
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "glm-4.7-flash (active): OK" in out
    assert "vllm serve zai-org/GLM-4.7-Flash" in out and "--tensor-parallel-size 2" in out
    assert "CUDA_VISIBLE_DEVICES=2,3" in out
    assert "qwen3-coder-fp8: cannot run on this node: profile qwen3-coder-fp8 needs CUDA >= 12.8" in out


def test_help_and_version() -> None:
    out = subprocess.run([*EXE, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("exporter-watchdog ")
    for sub in (["serve"], ["status"], ["models"], ["switch"], ["check"], ["demo"], ["demo", "job"], ["demo", "llm"]):
        res = subprocess.run([*EXE, *sub, "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and "usage:" in res.stdout, sub


def test_status_without_daemon_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = subprocess.run([*EXE, "status", "--config", str(config)], capture_output=True, text=True, timeout=60,
                            env={**os.environ})
    assert result.returncode == 3 and "no daemon is running" in result.stderr


def test_exporter_only_never_starts_a_server(tmp_path: Path) -> None:
    proc = DaemonProc(tmp_path, FAST_DEMO, args=["--exporter-only"])
    try:
        doc = proc.start(wait_state="disabled").status()
        assert doc is not None
        assert doc["server_pid"] is None and doc["disabled_reason"] == "exporter-only mode"
        proc.demo_job("--gpus", "1", "--seconds", "0")  # no Slurm view in this mode: nothing changes
        text = proc.metrics()
        for family in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_POWER_USAGE",
                       "exporter_watchdog_gpu_up", "exporter_watchdog_gpu_owner"):
            assert f"\n{family}{{" in text, family
        assert 'exporter_watchdog_state{state="disabled"} 1.0' in text
        assert not (proc.state_dir / "server.json").exists()
    finally:
        proc.stop()


def test_demo_gpu_metrics_show_the_server_on_claimed_gpus(daemon: DaemonProc) -> None:
    daemon.start()

    def owner_lines() -> list[str]:
        return [line for line in daemon.metrics().splitlines()
                if line.startswith("exporter_watchdog_gpu_owner{") and line.endswith(" 1.0")]

    lines = wait_until(lambda: [ln for ln in owner_lines() if 'owner="watchdog"' in ln], 10, "owner series")
    assert sorted(ln.split('gpu="')[1].split('"')[0] for ln in lines) == ["2", "3"]
    text = daemon.metrics()
    used = {ln.split('gpu="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines() if ln.startswith("DCGM_FI_DEV_FB_USED{")}
    assert used["3"] > used["0"], used  # our server's memory shows on the GPUs it holds
