"""RunPod pods simulated on one machine: docker/runpod/entrypoint.sh, the script the image runs,
started in network namespaces with a private /run each, configured from env alone.

Each pod has a container-like host name (random hex), a pod id (its Slurm node name) that resolves
as `<POD_ID>.runpod.internal` through a shared hosts file, its own root for /etc and /var
(`EW_ROOT`), fake GPU character devices (`GPU_DEVICE_DIR`) and simulated GPU metrics
(`EW_SIMULATED_GPUS=1`): the documented overrides for running outside a container.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loguru import logger

from tests.support.netns import NamespaceNet
from tests.support.slurm_cluster import SBIN_PATH, make_fake_gpus, unique_name, wait_for

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "docker" / "runpod" / "entrypoint.sh"
EXE = f"{sys.executable} -m exporter_watchdog.cli"


@dataclass
class Pod:
    """One simulated pod: its identity, its root folder and the entrypoint process."""

    role: str
    pod_id: str
    hostname: str
    root: Path
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    ns: str | None = None  # its mount namespace, recorded once it is up

    @property
    def internal(self) -> str:
        return f"{self.pod_id}.runpod.internal"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def slurm_conf(self) -> str:
        if self.role == "head":
            return str(self.root / "etc" / "slurm" / "slurm.conf")
        return "/run/slurm/conf/slurm.conf"

    def enter(self, argv: Sequence[str]) -> list[str]:
        """argv run inside the pod: its network, mounts (its /run, /etc/hosts) and host name."""
        return ["nsenter", "-t", str(self.pid), "-n", "-m", "-u", *argv]

    def run(self, argv: Sequence[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = self.slurm_conf
        env["PATH"] = f"{env.get('PATH', '')}:{SBIN_PATH}"
        return subprocess.run(self.enter(argv), env=env, capture_output=True, text=True, timeout=timeout)

    def cli(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        return self.run([*EXE.split(), *args], timeout=timeout)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def child_pid(self, name: str) -> int | None:
        """The PID the entrypoint logged for `name` ("started NAME (pid N)")."""
        for line in self.text().splitlines():
            if line.startswith(f"entrypoint: started {name} (pid "):
                return int(line.rsplit("pid ", 1)[1].rstrip(")"))
        return None

    def mount_ns(self) -> str | None:
        try:
            return os.readlink(f"/proc/{self.pid}/ns/mnt")
        except OSError:
            return None


def pod_processes(mount_ns: str) -> list[int]:
    """PIDs of every process in the given mount namespace (a pod's processes)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/mnt") == mount_ns:
                    found.append(int(entry))
            except OSError:
                continue
    return found


class PodCluster:
    """A head pod and worker pods from docker/runpod/entrypoint.sh, each in its own namespaces."""

    def __init__(self, workdir: Path, workers: int = 2, gpus: int = 2, extra_env: dict[str, str] | None = None):
        self.workdir = workdir
        self.prefix = unique_name("rp")
        # munged (as user munge) must reach the key and its folders: a world-traversable base.
        self.base = Path(tempfile.mkdtemp(prefix=f"{self.prefix}-", dir="/tmp"))
        self.base.chmod(0o755)
        self.munge_key = secrets.token_bytes(48)
        self.gpus = gpus
        names = ["h"] + [chr(ord("a") + i) for i in range(workers)]
        self.pods: list[Pod] = []
        hosts = [secrets.token_hex(6) for _ in names]  # container ids: what RunPod makes the host name
        self.net = NamespaceNet(self.prefix, hosts[0], hosts[1:], self.base / "hosts")
        worker_ids = [f"{self.prefix}{n}" for n in names[1:]]
        for name, hostname in zip(names, hosts, strict=True):
            role = "head" if name == "h" else "worker"
            root = self.base / f"pod-{name}"
            root.mkdir(mode=0o755)
            pod_id = f"{self.prefix}{name}"
            env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "EW_", "RUNPOD_"))}
            env.update({
                "PATH": f"{env.get('PATH', '')}:{SBIN_PATH}",
                "NODE_ROLE": role,
                "RUNPOD_POD_ID": pod_id,
                "RUNPOD_GPU_COUNT": str(gpus),
                "CLUSTER_NAME": self.prefix,
                "WORKER_NODES": ",".join(worker_ids),
                "MUNGE_KEY": base64.b64encode(self.munge_key).decode(),
                "EW_PROFILE": "demo",
                "EW_CLAIM_GPUS": "1",
                "EW_COOLDOWN_SECONDS": "1",
                "EW_SQUEUE_INTERVAL": "1",
                "EW_ROOT": str(root),
                "GPU_DEVICE_DIR": str(self.base / "dev" / "%n"),
                "EW_SIMULATED_GPUS": "1",
                "EXPORTER_WATCHDOG": EXE,
                "HEAD_WAIT_SECONDS": "120",
                **(extra_env or {}),
            })
            if role == "worker":
                env["HEAD_NODE_HOST"] = f"{self.prefix}h.runpod.internal"
            self.pods.append(Pod(role, pod_id, hostname, root, env, workdir / f"pod-{name}.log"))
        self.start_seconds: float | None = None

    @property
    def head(self) -> Pod:
        return self.pods[0]

    @property
    def workers(self) -> list[Pod]:
        return self.pods[1:]

    def start(self) -> PodCluster:
        """Namespaces and fake GPUs, then every pod's entrypoint; returns once sinfo shows all idle."""
        t0 = time.monotonic()
        self.net.create()
        lines = ["127.0.0.1 localhost"]
        for pod, host in zip(self.pods, [self.net.head, *self.net.workers], strict=True):
            lines.append(f"{host.address} {pod.hostname} {pod.internal}")
            make_fake_gpus(self.base / "dev" / pod.pod_id, self.gpus)
        self.net.hosts_file.write_text("\n".join(lines) + "\n")
        for pod in self.pods:
            self.spawn(pod)
        try:
            wait_for(self._all_idle, 120, "every pod's node idle in sinfo", 0.2)
        except BaseException:
            logger.error("pods did not come up:\n{}", self.log_tails())
            raise
        self.start_seconds = time.monotonic() - t0
        for pod in self.pods:
            pod.ns = pod.mount_ns()
        return self

    def spawn(self, pod: Pod) -> None:
        with open(pod.log, "ab") as out:
            pod.proc = subprocess.Popen(
                self.net.wrap(pod.hostname, ["bash", str(ENTRYPOINT)], private_run=True), env=pod.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def sinfo(self) -> dict[str, tuple[str, str]]:
        """Node -> (state, gres) as the head's sinfo lists them."""
        out = self.head.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], timeout=30).stdout
        return {f[0]: (f[1], f[2]) for f in (line.split() for line in out.splitlines()) if len(f) == 3}

    def _all_idle(self) -> bool:
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is not None:
                raise RuntimeError(f"pod {pod.pod_id} exited with {pod.proc.returncode}:\n{pod.text()[-3000:]}")
        nodes = self.sinfo()
        return all(nodes.get(p.pod_id, ("",))[0] == "idle" for p in self.pods)

    def status(self, pod: Pod) -> dict[str, Any] | None:
        import json

        proc = pod.cli("status", "--json", "--config", "/run/exporter-watchdog/config.yaml", timeout=30)
        if proc.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    def log_tails(self, chars: int = 3000) -> str:
        return "\n".join(f"--- {p.pod_id} ({p.role}) ---\n{p.text()[-chars:]}" for p in self.pods)

    def stop(self) -> list[str]:
        """SIGTERM every pod still running (workers first), then KILL whatever is left; remove it all."""
        problems: list[str] = []
        for pod in reversed(self.pods):
            if pod.proc is None:
                continue
            ns = pod.ns or pod.mount_ns()
            if pod.proc.poll() is None:
                pod.proc.send_signal(signal.SIGTERM)
                try:
                    pod.proc.wait(60)
                except subprocess.TimeoutExpired:
                    problems.append(f"pod {pod.pod_id} ignored SIGTERM")
            if ns is not None:
                for pid in pod_processes(ns):
                    problems.append(f"pod {pod.pod_id}: pid {pid} left")
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if pod.proc.poll() is None:
                os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc.wait(10)
        self.net.destroy()
        problems += [f"namespace {n} left" for n in self.net.leftovers()]
        shutil.rmtree(self.base, ignore_errors=True)
        return problems
