"""The files a pod needs, as text: slurm.conf, gres.conf, cgroup.conf, the daemon's config, the Prolog.

Pure: the settings and the installed Slurm's version and plugins come in as arguments, so every
variant (22.05 on Debian, 23.11 on Ubuntu 24.04, 24.05+ with cgroup.conf) is unit-tested.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from exporter_watchdog.runpod.settings import PodSettings

CTLD_PORT = 6817
SLURMD_PORT = 6818
SLURM_EXPORTER_PORT = 9341
# Per-pod runtime files; /run is private to each pod (and to each simulated pod in the tests).
RUN_DIR = "/run/exporter-watchdog"
PROLOG_PATH = f"{RUN_DIR}/prolog.sh"
CONFIG_PATH = f"{RUN_DIR}/config.yaml"
CONTROL_SOCKET = f"{RUN_DIR}/control.sock"
# Where a configless slurmd leaves the fetched config for the node's clients (Slurm >= 21.08).
CONFIGLESS_CONF = "/run/slurm/conf/slurm.conf"

_VERSION = re.compile(r"\bslurm(?:-wlm)?\s+(\d+)\.(\d+)")


@dataclass(frozen=True)
class SlurmInfo:
    """What the installed Slurm is and has."""

    version: tuple[int, int]
    nvml_plugin: bool  # gpu_nvml.so is installed: gres.conf AutoDetect=nvml works

    @property
    def text(self) -> str:
        return f"{self.version[0]}.{self.version[1]:02d}"


def parse_version(text: str) -> tuple[int, int]:
    """(22, 5) from `slurmd -V` output like 'slurm-wlm 22.05.8' or 'slurm 23.11.4'."""
    match = _VERSION.search(text)
    if match is None:
        raise ValueError(f"cannot read a Slurm version from {text.strip()[:80]!r}")
    return int(match.group(1)), int(match.group(2))


def gpu_files(settings: PodSettings, node: str, count: int) -> str:
    """gres.conf File= value for `count` GPUs of `node`: /dev/nvidia[0-N]."""
    folder = settings.gpu_device_dir.replace("%n", node).rstrip("/")
    return f"{folder}/nvidia0" if count == 1 else f"{folder}/nvidia[0-{count - 1}]"


def gres_conf(settings: PodSettings, slurm: SlurmInfo) -> str:
    """GPUs by autodetection where the build can, else one File= line per node this head knows."""
    header = "# Written by exporter-watchdog pod render; shipped to every node by configless Slurm.\n"
    if not settings.simulated_gpus:
        if slurm.version >= (24, 11):
            return header + "AutoDetect=nvidia\n"
        if slurm.nvml_plugin:
            return header + "AutoDetect=nvml\n"
    lines = [header.rstrip("\n"), "AutoDetect=off"]
    # Without autodetection only this node and those named in WORKER_NODES get device files (and
    # so GPU indices); workers are taken to have as many GPUs as the head.
    for node in [settings.node_name, *(w.name for w in settings.workers)]:
        if settings.gpus:
            lines.append(f"NodeName={node} Name=gpu File={gpu_files(settings, node, settings.gpus)}")
    return "\n".join(lines) + "\n"


def slurm_conf(settings: PodSettings, slurm: SlurmInfo) -> str:
    """The head's slurm.conf: configless, dynamic nodes, container-safe plugins, our Prolog."""
    s = settings
    lines = [
        f"# Written by exporter-watchdog pod render for Slurm {slurm.text}.",
        f"ClusterName={s.cluster}",
        f"SlurmctldHost={s.hostname}({s.node_addr})",
        f"SlurmctldPort={CTLD_PORT}",
        f"SlurmdPort={SLURMD_PORT}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # Containers: the daemons run as root, as everything else in the pod.
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={s.path('/var/spool/slurmctld')}",
        # %n: on a shared file system (the tests' simulated pods) each node keeps its own folder.
        f"SlurmdSpoolDir={s.path('/var/spool/slurmd')}/%n",
        "SlurmctldPidFile=/run/slurmctld.pid",
        "SlurmdPidFile=/run/slurmd.pid",
        f"SlurmctldLogFile={s.path('/var/log/slurm')}/slurmctld.log",
        f"SlurmdLogFile={s.path('/var/log/slurm')}/slurmd-%n.log",
        # Unprivileged containers: /sys/fs/cgroup is read-only, so no cgroup plugin may load.
        # Slurm then makes no job cgroups; the daemon lists jobs with squeue instead.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "GresTypes=gpu",
        "SlurmctldParameters=enable_configless",
        f"MaxNodeCount={s.max_nodes}",
        "ReturnToService=2",
        "MpiDefault=none",
        "MailProg=/bin/true",
        # Our Prolog hands the GPUs back before the job starts; Alloc runs it at allocation.
        f"Prolog={PROLOG_PATH}",
        "PrologFlags=Alloc",
    ]
    if slurm.version < (23, 2):
        # Dynamic nodes before 23.02 need a flat fan-out (no route through unknown nodes).
        lines.append("TreeWidth=65533")
    lines.append(f"PartitionName={s.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def cgroup_conf(slurm: SlurmInfo) -> str | None:
    """From 24.05 slurmd loads a cgroup plugin unless told not to; before that no file is needed."""
    if slurm.version >= (24, 5):
        return "CgroupPlugin=disabled\n"
    return None


def slurmd_conf(settings: PodSettings) -> str:
    """The `slurmd -Z --conf` string: this node's size, address and GPUs."""
    cpus, memory_mib = settings_host_size(settings)
    parts = [f"NodeAddr={settings.node_addr}", f"CPUs={cpus}", f"RealMemory={memory_mib}"]
    if settings.gpus:
        parts.append(f"Gres=gpu:{settings.gpus}")
    return " ".join(parts)


def settings_host_size(settings: PodSettings) -> tuple[int, int]:
    """CPUs and memory (MiB, with 10% headroom) of this machine, as slurmd will see them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory_kib = 0
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    memory_kib = int(line.split()[1])
                    break
    except (OSError, ValueError, IndexError):
        pass
    return max(cpus, 1), max(int(memory_kib / 1024 * 0.9), 100)


def daemon_config(settings: PodSettings, api_key_file: str | None) -> dict[str, Any]:
    """The daemon's config: full daemon with a profile, jobs listed by squeue, control socket in /run."""
    s = settings
    config: dict[str, Any] = {
        "node": {"name": s.node_name, "gpus": s.gpus or None},
        "claim": {"gpus": s.claim_gpus, "cooldown_seconds": s.cooldown_seconds},
        "server": {"profile": s.profile, "port": s.server_port, "host": "0.0.0.0"},
        "metrics": {"listen": f"0.0.0.0:{s.metrics_port}"},
        "slurm": {"detect": "squeue", "squeue_interval_seconds": s.squeue_interval_seconds},
        "state_dir": str(s.path("/var/lib/exporter-watchdog")),
        "control": {"socket": CONTROL_SOCKET},
        "exporter_only": s.profile is None or s.gpus == 0,
    }
    if api_key_file is not None:
        config["server"]["api_key_file"] = api_key_file
    return config


def daemon_config_text(settings: PodSettings, api_key_file: str | None) -> str:
    return "# Written by exporter-watchdog pod render.\n" + yaml.safe_dump(
        daemon_config(settings, api_key_file), sort_keys=False)


def prolog_script(exe: Sequence[str], log_file: str) -> str:
    """The Prolog slurmd runs: always exits 0 (the command does too), so a job never fails on us."""
    command = " ".join(shlex.quote(part) for part in exe)
    return (
        "#!/bin/sh\n"
        "# Written by exporter-watchdog pod render: hand the job's GPUs back before it starts.\n"
        f"{command} prolog --config {CONFIG_PATH} --log {shlex.quote(log_file)} || true\n"
        "exit 0\n"
    )


def shell_env(values: dict[str, str]) -> str:
    """Lines a POSIX shell can source; every value quoted."""
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())
