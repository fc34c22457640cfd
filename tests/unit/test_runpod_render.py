"""The pod's settings from env and the files rendered for each Slurm version."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from exporter_watchdog.runpod.render import (
    SlurmInfo,
    cgroup_conf,
    daemon_config,
    gres_conf,
    parse_version,
    prolog_script,
    slurm_conf,
    slurmd_conf,
)
from exporter_watchdog.runpod.settings import PodError, PodSettings, load_settings

KEY = base64.b64encode(bytes(range(40))).decode()
DEBIAN_12 = SlurmInfo((22, 5), nvml_plugin=False)
UBUNTU_2404 = SlurmInfo((23, 11), nvml_plugin=True)
DEBIAN_13 = SlurmInfo((24, 11), nvml_plugin=False)


def settings(**env: str) -> PodSettings:
    base = {"NODE_ROLE": "head", "MUNGE_KEY": KEY, "RUNPOD_POD_ID": "AbC123xyz", "RUNPOD_GPU_COUNT": "4"}
    base.update(env)
    return load_settings({k: v for k, v in base.items() if v != ""}, hostname="0f3c2a9e1b7d.local",
                         resolve=lambda name: "10.1.2.3", nvml_gpus=lambda: None)


def conf_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_a_pod_is_named_by_its_pod_id_and_reached_at_its_internal_name() -> None:
    s = settings()
    assert (s.node_name, s.node_addr, s.hostname) == ("abc123xyz", "abc123xyz.runpod.internal", "0f3c2a9e1b7d")
    assert s.cluster == "gpu-watchdog" and s.gpus == 4 and s.munge_key == bytes(range(40))
    assert settings(RUNPOD_POD_ID="", NODE_NAME="").node_name == "0f3c2a9e1b7d"  # outside RunPod: host name
    assert settings(RUNPOD_POD_ID="").node_addr == "10.1.2.3"  # ... and the address it resolves to
    assert settings(NODE_ADDR="10.9.9.9").node_addr == "10.9.9.9"


def test_nvml_count_wins_over_runpods_and_gpu_count_over_both() -> None:
    env = {"NODE_ROLE": "worker", "HEAD_NODE_HOST": "h.runpod.internal", "MUNGE_KEY": KEY, "RUNPOD_GPU_COUNT": "2"}
    assert load_settings(env, hostname="x", resolve=lambda n: "1.1.1.1", nvml_gpus=lambda: 8).gpus == 8
    assert load_settings({**env, "GPU_COUNT": "1"}, hostname="x", resolve=lambda n: "1.1.1.1",
                         nvml_gpus=lambda: 8).gpus == 1


@pytest.mark.parametrize("env, var, words", [
    ({"NODE_ROLE": ""}, "NODE_ROLE", "missing"),
    ({"NODE_ROLE": "master"}, "NODE_ROLE", "not head or worker"),
    ({"MUNGE_KEY": ""}, "MUNGE_KEY", "missing"),
    ({"MUNGE_KEY": base64.b64encode(b"x" * 31).decode()}, "MUNGE_KEY", "too short: 31 bytes"),
    ({"MUNGE_KEY": "%%%%"}, "MUNGE_KEY", "not valid base64"),
    ({"NODE_ROLE": "worker"}, "HEAD_NODE_HOST", "missing"),
    ({"RUNPOD_GPU_COUNT": ""}, "GPU_COUNT", "NVML sees no GPU"),
    ({"GPU_COUNT": "two"}, "GPU_COUNT", "not a whole number"),
    ({"EW_CLAIM_GPUS": "5"}, "EW_CLAIM_GPUS", "more than the pod's 4 GPUs"),
    ({"CLUSTER_NAME": "Bad Name"}, "CLUSTER_NAME", "lower-case"),
    ({"WORKER_NODES": "w1:10.0.0.2,bad name"}, "WORKER_NODES", "not a node name"),
    ({"EW_COOLDOWN_SECONDS": "-1"}, "EW_COOLDOWN_SECONDS", "positive"),
    ({"EW_ROOT": "relative/root"}, "EW_ROOT", "absolute"),
])
def test_bad_environment_names_the_variable(env: dict[str, str], var: str, words: str) -> None:
    with pytest.raises(PodError) as caught:
        settings(**env)
    assert caught.value.var == var and words in str(caught.value)
    assert str(caught.value).startswith(f"{var}: ")


def test_key_errors_never_show_the_key() -> None:
    short = base64.b64encode(b"secret-bytes").decode()
    with pytest.raises(PodError) as caught:
        settings(MUNGE_KEY=short)
    assert short not in str(caught.value) and "secret" not in str(caught.value)


def test_version_parsing() -> None:
    assert parse_version("slurm-wlm 22.05.8\n") == (22, 5)
    assert parse_version("slurm 23.11.4") == (23, 11)
    with pytest.raises(ValueError):
        parse_version("command not found")


def test_slurm_conf_for_2205_has_what_dynamic_nodes_need_there() -> None:
    lines = conf_lines(slurm_conf(settings(), DEBIAN_12))
    for wanted in (
        "ClusterName=gpu-watchdog", "SlurmctldHost=0f3c2a9e1b7d(abc123xyz.runpod.internal)",
        "SlurmctldParameters=enable_configless", "MaxNodeCount=64", "GresTypes=gpu",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "Prolog=/run/exporter-watchdog/prolog.sh", "PrologFlags=Alloc", "TreeWidth=65533",
        "PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
    ):
        assert wanted in lines
    assert not any("cgroup" in line.lower() for line in lines)
    assert cgroup_conf(DEBIAN_12) is None


def test_slurm_conf_for_2311_and_2411() -> None:
    lines = conf_lines(slurm_conf(settings(MAX_NODES="10", PARTITION="all"), UBUNTU_2404))
    assert "TreeWidth=65533" not in lines and "MaxNodeCount=10" in lines and lines[-1].startswith("PartitionName=all ")
    assert cgroup_conf(UBUNTU_2404) is None
    assert cgroup_conf(DEBIAN_13) == "CgroupPlugin=disabled\n"


def test_paths_follow_the_root_override() -> None:
    lines = conf_lines(slurm_conf(settings(EW_ROOT="/tmp/pod1"), DEBIAN_12))
    assert "StateSaveLocation=/tmp/pod1/var/spool/slurmctld" in lines
    assert "SlurmdSpoolDir=/tmp/pod1/var/spool/slurmd/%n" in lines
    assert "StateSaveLocation=/var/spool/slurmctld" in conf_lines(slurm_conf(settings(), DEBIAN_12))


def test_gres_conf_autodetects_where_the_build_can_else_lists_device_files() -> None:
    assert conf_lines(gres_conf(settings(), UBUNTU_2404)) == ["AutoDetect=nvml"]
    assert conf_lines(gres_conf(settings(), DEBIAN_13)) == ["AutoDetect=nvidia"]
    assert conf_lines(gres_conf(settings(WORKER_NODES="w1:10.0.0.2, w2"), DEBIAN_12)) == [
        "AutoDetect=off",
        "NodeName=abc123xyz Name=gpu File=/dev/nvidia[0-3]",
        "NodeName=w1 Name=gpu File=/dev/nvidia[0-3]",
        "NodeName=w2 Name=gpu File=/dev/nvidia[0-3]",
    ]
    simulated = settings(EW_SIMULATED_GPUS="1", GPU_DEVICE_DIR="/tmp/dev/%n", RUNPOD_GPU_COUNT="1")
    assert conf_lines(gres_conf(simulated, UBUNTU_2404)) == [
        "AutoDetect=off", "NodeName=abc123xyz Name=gpu File=/tmp/dev/abc123xyz/nvidia0"]


def test_slurmd_conf_names_address_size_and_gpus() -> None:
    parts = dict(p.split("=", 1) for p in slurmd_conf(settings()).split())
    assert parts["NodeAddr"] == "abc123xyz.runpod.internal" and parts["Gres"] == "gpu:4"
    assert int(parts["CPUs"]) >= 1 and int(parts["RealMemory"]) >= 100
    assert "Gres" not in slurmd_conf(settings(RUNPOD_GPU_COUNT="0"))


def test_daemon_config_serves_a_profile_with_squeue_detection() -> None:
    config = daemon_config(settings(EW_PROFILE="qwen3-coder-fp8", EW_CLAIM_GPUS="2"), "/run/exporter-watchdog/api-key")
    assert config["server"] == {"profile": "qwen3-coder-fp8", "port": 8000, "host": "0.0.0.0",
                                "api_key_file": "/run/exporter-watchdog/api-key"}
    assert config["slurm"]["detect"] == "squeue" and config["exporter_only"] is False
    assert config["control"]["socket"] == "/run/exporter-watchdog/control.sock"
    assert daemon_config(settings(), None)["exporter_only"] is True  # no profile: metrics only



def test_rendered_daemon_config_is_one_the_daemon_accepts(tmp_path: Path) -> None:
    from exporter_watchdog.config import load_config
    from exporter_watchdog.runpod.render import daemon_config_text

    path = tmp_path / "config.yaml"
    path.write_text(daemon_config_text(settings(EW_PROFILE="demo", EW_ROOT=str(tmp_path)), None))
    config = load_config(path)
    assert (config.node.name, config.node.gpus, config.slurm.detect) == ("abc123xyz", 4, "squeue")
    assert config.state_dir == tmp_path / "var/lib/exporter-watchdog"
    assert yaml.safe_load(path.read_text())["metrics"]["listen"] == "0.0.0.0:9400"


def test_prolog_script_always_exits_zero() -> None:
    text = prolog_script(["/opt/venv/bin/python", "-m", "exporter_watchdog.cli"], "/var/log/p.log")
    assert text.startswith("#!/bin/sh\n") and text.rstrip().endswith("exit 0")
    assert "prolog --config /run/exporter-watchdog/config.yaml --log /var/log/p.log || true" in text
