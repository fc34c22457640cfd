"""Hosts made of network namespaces, and a Slurm head with configless workers on them."""

from __future__ import annotations

import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from loguru import logger

from tests.support.slurm_cluster import (
    CGROUP_CONF,
    COMMON_CONF,
    START_TIMEOUT,
    ClusterBase,
    Daemon,
    ensure_slurm,
    gres_spec,
    make_fake_gpus,
    remove_node_cgroups,
    spawn,
    unique_name,
    wait_for,
    which_program,
)

NETNS_DIR = Path("/run/netns")
# The configless slurmd looks for munge here before it has fetched AuthInfo from the controller.
MUNGE_DEFAULT_SOCKET = "/run/munge/munge.socket.2"


@dataclass(frozen=True)
class Host:
    """One simulated machine: a hostname, the network namespace it lives in, and its address."""

    name: str
    netns: str
    address: str


def _ip(*args: str) -> None:
    """Run one `ip` command, raising with its stderr on failure."""
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {proc.stderr.strip()}")


class NamespaceNet:
    """A head and workers, each in its own network namespace, joined by a bridge in the head's.

    Every link and address lives inside namespaces this class creates, so nothing on the machine's
    own network changes, and two of these can exist at once with the same addresses.
    """

    def __init__(self, prefix: str, head: str, workers: Sequence[str], hosts_file: Path) -> None:
        names = [head, *workers]
        self.hosts_file = hosts_file
        self.head = Host(head, f"{prefix}-0", "10.77.0.1")
        self.workers = [Host(w, f"{prefix}-{i}", f"10.77.0.{i + 1}") for i, w in enumerate(workers, 1)]
        self.by_name = {h.name: h for h in [self.head, *self.workers]}
        if len(self.by_name) != len(names):
            raise ValueError(f"host names must differ: {names}")
        self._created: list[str] = []

    def create(self) -> None:
        """Make the namespaces, the bridge, the veth pairs, addresses and the shared hosts file."""
        for host in self.by_name.values():
            if (NETNS_DIR / host.netns).exists():
                raise RuntimeError(f"network namespace {host.netns} already exists")
            _ip("netns", "add", host.netns)
            self._created.append(host.netns)
            _ip("-n", host.netns, "link", "set", "lo", "up")
        head = self.head.netns
        _ip("-n", head, "link", "add", "br0", "type", "bridge")
        _ip("-n", head, "addr", "add", f"{self.head.address}/24", "dev", "br0")
        _ip("-n", head, "link", "set", "br0", "up")
        for i, worker in enumerate(self.workers, 1):
            # Both ends are made inside the head's namespace, so the machine's own one never sees them.
            _ip("-n", head, "link", "add", f"vw{i}", "type", "veth", "peer", "name", f"vp{i}")
            _ip("-n", head, "link", "set", f"vp{i}", "netns", worker.netns)
            _ip("-n", worker.netns, "link", "set", f"vp{i}", "name", "eth0")
            _ip("-n", worker.netns, "addr", "add", f"{worker.address}/24", "dev", "eth0")
            _ip("-n", worker.netns, "link", "set", "eth0", "up")
            _ip("-n", head, "link", "set", f"vw{i}", "master", "br0")
            _ip("-n", head, "link", "set", f"vw{i}", "up")
        lines = ["127.0.0.1 localhost"] + [f"{h.address} {h.name}" for h in self.by_name.values()]
        self.hosts_file.write_text("\n".join(lines) + "\n")
        logger.debug("namespaces {} up", self._created)

    def destroy(self) -> None:
        """Delete the namespaces; their bridge and veth pairs go with them."""
        for name in reversed(self._created):
            if (NETNS_DIR / name).exists():
                try:
                    _ip("netns", "del", name)
                except RuntimeError as exc:
                    logger.warning("{}", exc)
        self._created = [n for n in self._created if (NETNS_DIR / n).exists()]

    def leftovers(self) -> list[str]:
        """Namespaces of this net that still exist."""
        return [h.netns for h in self.by_name.values() if (NETNS_DIR / h.netns).exists()]

    def wrap(self, host: str, argv: Sequence[str], munge_socket: Path | None = None,
             private_run: bool = False) -> list[str]:
        """The argv that runs `argv` as if on `host`: its network, hostname and /etc/hosts.

        `nsenter --net` keeps the machine's /sys (so cgroups stay visible), unlike `ip netns exec`.
        Neither nsenter (no PID namespace) nor unshare (no --fork) forks, and the shell execs, so
        the PID of the process started from this argv is the PID of `argv` itself.
        `private_run` gives the host an empty /run of its own, as a container has.
        """
        h = self.by_name[host]
        steps = [f"mount --bind {shlex.quote(str(self.hosts_file))} /etc/hosts", f"hostname {h.name}"]
        if private_run and munge_socket is None:
            steps.append("mount -t tmpfs -o mode=755 tmpfs /run")
        if munge_socket is not None:
            steps += [
                "mount -t tmpfs tmpfs /run",
                f"mkdir -p {Path(MUNGE_DEFAULT_SOCKET).parent}",
                f"ln -s {shlex.quote(str(munge_socket))} {MUNGE_DEFAULT_SOCKET}",
            ]
        script = " && ".join([*steps, 'exec "$@"'])
        return ["nsenter", f"--net={NETNS_DIR / h.netns}", "unshare", "--uts", "--mount",
                "sh", "-c", script, "sh", *argv]

    def enter(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` in `host`'s network namespace only (for Slurm clients)."""
        return ["nsenter", f"--net={NETNS_DIR / self.by_name[host].netns}", *argv]


class SlurmMultiNode(ClusterBase):
    """A head (slurmctld) and workers (configless, dynamically registered slurmd) in namespaces."""

    CTLD_PORT = 6817  # fixed: every daemon lives in namespaces of its own, so nothing can clash
    SLURMD_PORT = 6818

    def __init__(
        self,
        workdir: Path,
        workers: int = 2,
        gpus_per_worker: int = 2,
        gpu_type: str | None = None,
        cpus_per_worker: int = 2,
        prefix: str | None = None,
    ) -> None:
        super().__init__(workdir)
        self.prefix = prefix or unique_name("wm")
        self.head = f"{self.prefix}-head"
        self.workers = [f"{self.prefix}-w{i}" for i in range(1, workers + 1)]
        self.nodes = list(self.workers)
        self.gpus_per_worker = gpus_per_worker
        self.gpu_type = gpu_type
        self.cpus_per_worker = cpus_per_worker
        self.net = NamespaceNet(self.prefix, self.head, self.workers, self.workdir / "hosts")
        self._spawned: list[subprocess.Popen[bytes]] = []

    def client_argv(self, argv: Sequence[str]) -> list[str]:
        """Clients run in the head's network namespace, where the controller's address is."""
        return self.net.enter(self.head, argv)

    def worker_env(self, worker: str) -> dict[str, str]:
        """Environment for commands on a worker: clients read the config its slurmd fetched."""
        env = self.env
        env["SLURM_CONF"] = str(self.workdir / "spool" / worker / "conf-cache" / "slurm.conf")
        return env

    def write_config(self) -> None:
        """Write the head's slurm.conf (configless, dynamic nodes), gres.conf and cgroup.conf."""
        self._dirs()
        w = self.workdir
        gres_lines = ["AutoDetect=off"]
        for worker in self.workers:
            typed = f" Type={self.gpu_type}" if self.gpu_type else ""
            files = make_fake_gpus(w / "dev" / worker, self.gpus_per_worker)
            gres_lines.append(f"NodeName={worker} Name=gpu{typed} File={files}")
        lines = [
            f"ClusterName={self.prefix}",
            f"SlurmctldHost={self.head}({self.net.head.address})",
            f"SlurmctldPort={self.CTLD_PORT}",
            f"SlurmdPort={self.SLURMD_PORT}",
            COMMON_CONF.format(sock=self.munge_socket, w=w).rstrip(),
            f"SlurmdSpoolDir={w}/spool/%n",
            f"SlurmdPidFile={w}/run/slurmd-%n.pid",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "SlurmdParameters=config_overrides",
            "SlurmctldParameters=enable_configless",
            "PrologFlags=Contain",
            "MaxNodeCount=16",
            "Nodeset=dyn Feature=dyn",
            "PartitionName=main Nodes=dyn Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")
        (w / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        (w / "cgroup.conf").write_text(CGROUP_CONF)

    def start(self) -> SlurmMultiNode:
        """Namespaces, munged, slurmctld on the head, slurmd -Z on each worker; wait for all idle."""
        t0 = time.monotonic()
        ensure_slurm()
        for node in self.workers:
            remove_node_cgroups(node)
        self._dirs()
        try:
            self.net.create()
            self.write_config()
            self._start_munge()
            self.daemons["slurmctld"] = spawn(
                "slurmctld",
                self.net.wrap(self.head, [which_program("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)]),
                self.workdir / "log" / "slurmctld.out", self.env,
            )
            wait_for(self._ctld_answers, START_TIMEOUT, "slurmctld to answer")
            worker_env = {k: v for k, v in self.env.items() if k != "SLURM_CONF"}  # configless
            for worker in self.workers:
                conf = f"CPUs={self.cpus_per_worker} RealMemory=1000 Feature=dyn"
                if self.gpus_per_worker > 0:
                    conf += f" Gres={gres_spec(self.gpu_type, self.gpus_per_worker)}"
                # -N as well as the hostname: with it %n in SlurmdSpoolDir is known before the config
                # is fetched, so each worker caches the config in its own folder.
                (self.workdir / "spool" / worker).mkdir(exist_ok=True)
                argv = [which_program("slurmd") or "slurmd", "-D", "-Z", "-N", worker,
                        "--conf-server", f"{self.head}:{self.CTLD_PORT}", "--conf", conf]
                self.daemons[f"slurmd-{worker}"] = spawn(
                    "slurmd", self.net.wrap(worker, argv, munge_socket=self.munge_socket),
                    self.workdir / "log" / f"slurmd-{worker}.out", worker_env,
                )
            wait_for(self._all_idle, START_TIMEOUT, f"workers {self.workers} idle", 0.1)
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            if isinstance(exc, (RuntimeError, TimeoutError)):
                raise RuntimeError(f"multi-node Slurm did not come up: {exc}\n{tail}") from exc
            raise
        self.start_seconds = time.monotonic() - t0
        logger.info("multi-node slurm {} up in {:.2f} s", self.prefix, self.start_seconds)
        return self

    def _ctld_answers(self) -> bool:
        self._died("slurmctld", raise_=True)
        return self.run(["scontrol", "ping"], check=False, timeout=30).returncode == 0

    def node_states(self) -> dict[str, str]:
        """State of every registered node, e.g. {"wm1a2b3c-w1": "idle"}."""
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=30).stdout
        return dict(line.split(None, 1) for line in out.splitlines() if line.strip())

    def _all_idle(self) -> bool:
        for name in self.daemons:
            self._died(name, raise_=True)
        states = self.node_states()
        return all(states.get(w) == "idle" for w in self.workers)

    def run_in(self, worker: str, argv: Sequence[str], timeout: float = 60.0,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command as if on `worker` (its network, hostname, /etc/hosts); wait for it."""
        return subprocess.run(self.net.wrap(worker, argv), env=env or self.worker_env(worker),
                              capture_output=True, text=True, timeout=timeout)

    def spawn_in(self, worker: str, argv: Sequence[str], log: Path | None = None,
                 env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a process as if on `worker`, in its own process group; stopped by stop()."""
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        try:
            popen = subprocess.Popen(self.net.wrap(worker, argv), env=env or self.worker_env(worker),
                                     stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        finally:
            if log:
                out.close()  # type: ignore[union-attr]
        self._spawned.append(popen)
        return popen

    def stop(self) -> list[str]:
        """Stop spawned processes, jobs, slurmds, slurmctld, munged; remove cgroups and namespaces."""
        t0 = time.monotonic()
        spawned = [Daemon("spawned", p.pid, p, group=True) for p in self._spawned]
        problems = self._teardown([n for n in self.daemons if n.startswith("slurmd-")], spawned)
        self.net.destroy()
        if self.net.leftovers():
            problems.append(f"namespaces left: {self.net.leftovers()}")
        self.stop_seconds = time.monotonic() - t0
        logger.info("multi-node slurm {} down in {:.2f} s", self.prefix, self.stop_seconds)
        return problems

    def leftovers(self) -> list[str]:
        """Daemons, cgroup directories and namespaces still present (empty when torn down)."""
        return super().leftovers() + self.net.leftovers() + [
            f"pid {p.pid}" for p in self._spawned if p.poll() is None
        ]

    def __enter__(self) -> SlurmMultiNode:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
