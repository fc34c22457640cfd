"""Real Slurm 22.05 test clusters: one node with fake GPUs on loopback (several hosts: netns.py)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from loguru import logger

from tests.support.waiting import free_port as _free_port
from tests.support.waiting import wait_for  # noqa: F401  (re-exported)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo", "munged", "mungekey")
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NVIDIA_MAJOR = 195
TERMINAL_STATES = frozenset({
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
    "DEADLINE", "PREEMPTED",
})
# Generous: other people run tests on the same 2 cores, and a cold first job takes up to 4 s here.
START_TIMEOUT = 90.0
JOB_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
T = TypeVar("T")


class SlurmUnavailable(RuntimeError):
    """Slurm or munge is missing and cannot be installed here (or we are not root)."""


def in_ci() -> bool:
    """Whether the run is CI, where a missing service fails the tests instead of skipping them."""
    return os.environ.get("CI", "").lower() == "true"


def which_program(program: str) -> str | None:
    return shutil.which(program, path=f"{os.environ.get('PATH', '')}:{SBIN_PATH}")


def ensure_slurm(install: bool = True) -> None:
    """Install the Slurm and munge packages when missing and root; raise SlurmUnavailable if not."""
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster needs root (mknod, job cgroups, SlurmUser=root)")
    missing = [p for p in PROGRAMS if which_program(p) is None]
    if missing and install and which_program("apt-get"):
        logger.info("installing {} (missing: {})", " ".join(PACKAGES), missing)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                logger.warning("{} failed: {}", " ".join(argv), proc.stderr.strip()[-2000:])
        missing = [p for p in PROGRAMS if which_program(p) is None]
    if missing:
        raise SlurmUnavailable(f"missing programs {missing}; install: apt-get install {' '.join(PACKAGES)}")


def free_port() -> int:
    """A TCP port nobody listens on right now (on any address, as slurmd binds 0.0.0.0)."""
    return _free_port("0.0.0.0")


def unique_name(prefix: str = "wd") -> str:
    """A short node-name-safe name, unique per run, so job cgroups of parallel runs never mix."""
    return f"{prefix}{secrets.token_hex(3)}"


@dataclass
class Daemon:
    """A process this cluster started, known by PID (and its Popen while we are its parent)."""

    name: str  # program name, checked in /proc/PID/cmdline before signalling a PID read from disk
    pid: int
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    group: bool = False  # signal its whole process group (it leads one), not just the PID

    def alive(self) -> bool:
        """Whether the process still runs (a zombie does not count)."""
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.name.encode() in cmdline

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL at the deadline; reap it when it is our child."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
            if not self.alive():
                return
            try:
                if self.group:
                    os.killpg(self.pid, sig)
                else:
                    os.kill(self.pid, sig)
            except ProcessLookupError:
                return
            try:
                wait_for(lambda: not self.alive(), wait, f"{self.name} (pid {self.pid}) to exit", 0.05)
            except TimeoutError:
                logger.warning("{} pid {} ignored {}", self.name, self.pid, sig.name)
        if self.alive():
            raise RuntimeError(f"{self.name} pid {self.pid} survived SIGKILL")


def spawn(name: str, argv: Sequence[str], log: Path, env: dict[str, str]) -> Daemon:
    """Start a daemon in its own session, stdout and stderr appended to `log`."""
    with open(log, "ab") as out:
        popen = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,
        )
    logger.debug("started {} pid {}: {}", name, popen.pid, " ".join(argv))
    return Daemon(name, popen.pid, popen)


def node_cgroup_dirs(node: str) -> list[Path]:
    """The per-node Slurm cgroup directories of every v1 controller (multiple-slurmd layout)."""
    return sorted(CGROUP_ROOT.glob(f"*/slurm_{node}"))


def cgroup_pids(top: Path) -> set[int]:
    """PIDs in a cgroup directory and all below it."""
    pids: set[int] = set()
    for procs in top.rglob("cgroup.procs"):
        try:
            pids.update(int(p) for p in procs.read_text().split())
        except OSError:
            continue  # the directory went away while we walked
    return pids


def remove_node_cgroups(node: str, timeout: float = STOP_TIMEOUT) -> list[Path]:
    """Kill what is left in the node's cgroups (only job processes can be there), then rmdir them.

    Returns the directories that could not be removed.
    """
    tops = node_cgroup_dirs(node)
    pids = set().union(*(cgroup_pids(t) for t in tops)) if tops else set()
    for pid in pids:
        logger.warning("killing leftover pid {} in slurm_{} cgroups", pid, node)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if pids:
        wait_for(lambda: not any(cgroup_pids(t) for t in tops), timeout, f"slurm_{node} cgroups to empty")
    left: list[Path] = []
    for top in tops:
        for dirpath, _dirs, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(Path(dirpath))
                logger.warning("cannot remove {}: {}", dirpath, exc)
    return left


class ClusterBase:
    """What both cluster shapes share: munge, client commands, jobs, job cgroups, teardown."""

    workdir: Path
    conf: Path
    nodes: list[str]

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.conf = self.workdir / "slurm.conf"
        self._munge_dir: Path | None = None
        self.daemons: dict[str, Daemon] = {}
        self.nodes = []
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # -- environment and client commands ------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm client commands run against this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SQUEUE_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = f"{env.get('PATH', '')}:{SBIN_PATH}"
        return env

    def client_argv(self, argv: Sequence[str]) -> list[str]:
        """How a client command reaches the controller (overridden when it lives in a namespace)."""
        return list(argv)

    def run(self, argv: Sequence[str], timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(
            self.client_argv(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def _dirs(self) -> None:
        for sub in ("state", "spool", "run", "log", "out", "dev"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)

    # -- munge --------------------------------------------------------------------------------
    @property
    def munge_dir(self) -> Path:
        """munged's folder: under /tmp, as munged wants every folder above its socket open to all
        (pytest's temporary folders are mode 700)."""
        if self._munge_dir is None:
            self._munge_dir = Path(tempfile.mkdtemp(prefix="wd-munge-", dir="/tmp"))
            self._munge_dir.chmod(0o755)
        return self._munge_dir

    @property
    def munge_socket(self) -> Path:
        """The munge socket slurm.conf points at (AuthInfo=socket=...)."""
        return self.munge_dir / "munge.socket"

    def _start_munge(self) -> None:
        key = self.munge_dir / "munge.key"
        if not key.exists():
            subprocess.run(
                [which_program("mungekey") or "mungekey", "--create", f"--keyfile={key}"],
                check=True, capture_output=True, timeout=30,
            )
        self.munge_socket.unlink(missing_ok=True)
        argv = [
            which_program("munged") or "munged", "--foreground", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={self.munge_dir / 'munged.pid'}",
            f"--seed-file={self.munge_dir / 'seed'}", f"--log-file={self.workdir / 'log' / 'munged.log'}",
        ]
        self.daemons["munged"] = spawn("munged", argv, self.workdir / "log" / "munged.out", self.env)
        wait_for(lambda: self.munge_socket.is_socket() or self._died("munged"), START_TIMEOUT, "munge socket")
        self._died("munged", raise_=True)

    def _died(self, name: str, raise_: bool = False) -> bool:
        daemon = self.daemons.get(name)
        dead = daemon is not None and not daemon.alive()
        if dead and raise_:
            raise RuntimeError(f"{name} exited at start; see {self.workdir / 'log'}")
        return dead

    # -- jobs ---------------------------------------------------------------------------------
    def sbatch(
        self,
        gpus: str | int | None = None,
        seconds: float = 300.0,
        *,
        nodes: int = 1,
        cpus: int = 1,
        command: str | None = None,
        extra: Sequence[str] = (),
    ) -> str:
        """Submit a batch job (`gpus`: 2 or "a30:2" means --gres=gpu:...; None: CPU-only); its id."""
        argv = [
            "sbatch", "--parsable", "-J", "wd-test", "-N", str(nodes), "-c", str(cpus),
            "-o", str(self.workdir / "out" / "%j.out"), f"--chdir={self.workdir}",
        ]
        if gpus is not None:
            argv.append(f"--gres=gpu:{gpus}")
        argv += [*extra, "--wrap", command if command is not None else f"sleep {seconds:g}"]
        job = self.run(argv).stdout.strip().split(";")[0]
        if not job.isdigit():
            raise RuntimeError(f"sbatch printed {job!r}")
        return job

    def cancel(self, job: str) -> None:
        """Cancel one job."""
        self.run(["scancel", job])

    def queue(self) -> list[str]:
        """Ids of jobs pending, running or completing."""
        return self.run(["squeue", "-h", "-o", "%i"]).stdout.split()

    def show_job(self, job: str) -> str:
        """`scontrol show job -d -o ID`: one line, with GRES=...(IDX:...) per node while it runs."""
        return self.run(["scontrol", "show", "job", "-d", "-o", job]).stdout.strip()

    def job_state(self, job: str) -> str:
        """The JobState of a job (RUNNING, PENDING, COMPLETED, ...)."""
        match = re.search(r"\bJobState=(\S+)", self.show_job(job))
        if match is None:
            raise RuntimeError(f"no JobState for job {job}")
        return match.group(1)

    def job_gres(self, job: str) -> dict[str, str]:
        """Per node, the GRES detail of a running job, e.g. {"n1": "gpu:a30:2(IDX:2-3)"}."""
        gres: dict[str, str] = {}
        for hostlist, detail in re.findall(r"\bNodes=(\S+) CPU_IDs=\S+ Mem=\S+ GRES=(\S*)", self.show_job(job)):
            for host in self.run(["scontrol", "show", "hostnames", hostlist]).stdout.split():
                gres[host] = detail
        return gres

    def wait_job_running(self, job: str, timeout: float = JOB_TIMEOUT) -> None:
        """Wait until the job runs; raise if it ends first or the deadline passes."""

        def running() -> bool:
            state = self.job_state(job)
            if state in TERMINAL_STATES:
                raise RuntimeError(f"job {job} ended as {state} before running: {self.show_job(job)}")
            return state == "RUNNING"

        wait_for(running, timeout, f"job {job} to run", 0.05)

    def wait_job_done(self, job: str, timeout: float = JOB_TIMEOUT) -> str:
        """Wait until the job has ended; its final state."""

        def ended() -> str | None:
            state = self.job_state(job)
            return state if state in TERMINAL_STATES else None

        return wait_for(ended, timeout, f"job {job} to end")

    def wait_queue_empty(self, timeout: float = JOB_TIMEOUT) -> None:
        """Wait until no job is pending, running or completing."""
        wait_for(lambda: not self.queue(), timeout, "queue to empty", 0.1)

    def cancel_all(self, timeout: float = JOB_TIMEOUT) -> None:
        """Cancel every job and wait for an empty queue."""
        jobs = self.queue()
        if jobs:
            self.run(["scancel", *jobs], check=False)
        self.wait_queue_empty(timeout)

    def warm_up(self, timeout: float = JOB_TIMEOUT) -> float:
        """Run one trivial CPU-only job to its end and wait for its cgroup to go; the seconds it took.

        slurmctld starts no job in its first ~3 s, so the first job of a fresh cluster starts late;
        a measurement that must not see that delay calls this first.
        """
        t0 = time.monotonic()
        job = self.sbatch(None, command="true")
        self.wait_job_done(job, timeout)
        self.wait_queue_empty(timeout)
        wait_for(lambda: not self.job_cgroup_dirs(), timeout, "the warm-up job's cgroup to go")
        return time.monotonic() - t0

    # -- job cgroups --------------------------------------------------------------------------
    def job_cgroup_dirs(self, node: str | None = None, controller: str = "freezer") -> list[Path]:
        """Job directories (…/slurm_<node>/uid_U/job_N) that exist now, of one node or all."""
        dirs: list[Path] = []
        for name in [node] if node else self.nodes:
            dirs += (CGROUP_ROOT / controller / f"slurm_{name}").glob("uid_*/job_*")
        return sorted(dirs)

    def job_cgroup_dir(self, job: str, node: str | None = None, controller: str = "freezer") -> Path | None:
        """The job's cgroup directory on a node (the first node when not named), if it exists now."""
        name = node or self.nodes[0]
        found = sorted((CGROUP_ROOT / controller / f"slurm_{name}").glob(f"uid_*/job_{job}"))
        return found[0] if found else None

    def wait_job_cgroup(self, job: str, node: str | None = None, timeout: float = JOB_TIMEOUT) -> Path:
        """Wait until the job's cgroup directory exists on a node; its path."""
        return wait_for(lambda: self.job_cgroup_dir(job, node), timeout, f"cgroup dir of job {job}", 0.02)

    # -- teardown -----------------------------------------------------------------------------
    def _teardown(self, slurmds: Sequence[str], extra_first: Sequence[Daemon] = ()) -> list[str]:
        """Stop jobs and daemons by PID in the order Slurm likes; problems found, as text."""
        problems: list[str] = []
        for daemon in extra_first:
            daemon.stop()
        ctld = self.daemons.get("slurmctld")
        if ctld is not None and ctld.alive():
            try:
                self.cancel_all()
            except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as exc:
                problems.append(f"jobs: {exc}")
        # slurmd before slurmctld: the other order makes slurmd retry for ~10 s.
        for name in [*slurmds, "slurmctld", "munged"]:
            stopping = self.daemons.get(name)
            if stopping is not None:
                try:
                    stopping.stop()
                except RuntimeError as exc:
                    problems.append(str(exc))
        for node in self.nodes:
            left = remove_node_cgroups(node)
            if left:
                problems.append(f"cgroup dirs left: {left}")
        munged = self.daemons.get("munged")
        if self._munge_dir is not None and not (munged and munged.alive()):
            shutil.rmtree(self._munge_dir, ignore_errors=True)
        return problems

    def leftovers(self) -> list[str]:
        """Daemons still alive and cgroup directories still present (empty when torn down)."""
        found = [f"{d.name} pid {d.pid}" for d in self.daemons.values() if d.alive()]
        if self._munge_dir is not None and self._munge_dir.exists():
            found.append(str(self._munge_dir))
        for node in self.nodes:
            found += [str(p) for p in node_cgroup_dirs(node)]
        return found

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of every daemon log, for error messages."""
        parts = []
        for log in sorted((self.workdir / "log").glob("*")):
            text = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {log.name}\n" + "\n".join(text))
        return "\n".join(parts)


def gres_spec(gpu_type: str | None, count: int) -> str:
    return f"gpu:{gpu_type}:{count}" if gpu_type else f"gpu:{count}"


def make_fake_gpus(devdir: Path, count: int) -> str:
    """Make `count` fake GPUs as character devices (plain files are refused); the gres.conf File=."""
    devdir.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = devdir / f"nvidia{i}"
        if not path.exists():
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(NVIDIA_MAJOR, i))
    return str(devdir / (f"nvidia[0-{count - 1}]" if count > 1 else "nvidia0"))


COMMON_CONF = """\
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={w}/state
SlurmctldPidFile={w}/run/slurmctld.pid
SlurmctldLogFile={w}/log/slurmctld.log
ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=5
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
"""
CGROUP_CONF = "CgroupPlugin=autodetect\nConstrainCores=yes\nConstrainDevices=yes\nConstrainRAMSpace=no\n"


def container_safe(conf: str) -> str:
    """slurm.conf text made like an unprivileged container's (a RunPod pod): no job cgroups at all."""
    return conf.replace("ProctrackType=proctrack/cgroup", "ProctrackType=proctrack/linuxproc").replace(
        "TaskPlugin=task/cgroup", "TaskPlugin=task/none")


class SlurmCluster(ClusterBase):
    """One node with fake GPUs: munged, slurmctld and slurmd on loopback, on free ports."""

    def __init__(
        self,
        workdir: Path,
        node: str = "wd-node",
        gpus: int = 4,
        gpu_type: str | None = "a30",
        cpus: int = 4,
        prolog: str | None = None,
        prolog_flags: str = "Contain",
        no_cgroups: bool = False,
    ) -> None:
        super().__init__(workdir)
        self.no_cgroups = no_cgroups  # proctrack/linuxproc and task/none, as in a container
        self.node = node
        self.nodes = [node]
        self.gpus = gpus
        self.gpu_type = gpu_type
        self.cpus = cpus
        self.prolog = prolog
        self.prolog_flags = prolog_flags
        self.ctld_port = 0
        self.slurmd_port = 0

    @property
    def gres(self) -> str:
        """The node's Gres= value, e.g. gpu:a30:4 or gpu:4."""
        return gres_spec(self.gpu_type, self.gpus)

    @property
    def state_file(self) -> Path:
        """Where the PIDs and settings are kept, so another process can stop the cluster."""
        return self.workdir / "cluster.json"

    def write_config(self) -> None:
        """Write slurm.conf, gres.conf, cgroup.conf (and the Prolog wrapper) into the workdir."""
        self._dirs()
        w = self.workdir
        host = socket.gethostname().split(".")[0]  # slurmctld only runs where SlurmctldHost names it
        lines = [
            f"ClusterName=wd{self.node.replace('-', '')[:20]}".lower(),
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            (container_safe if self.no_cgroups else str)(COMMON_CONF.format(sock=self.munge_socket, w=w)).rstrip(),
            f"SlurmdSpoolDir={w}/spool",
            f"SlurmdPidFile={w}/run/slurmd.pid",
            f"SlurmdLogFile={w}/log/slurmd.log",
            # The node claims more CPUs than a small machine has; use the configured count.
            "SlurmdParameters=config_overrides",
            f"PrologFlags={self.prolog_flags}",
        ]
        if self.prolog is not None:
            wrapper = w / "prolog.sh"
            wrapper.write_text(
                f"#!/bin/sh\nexport PATH={SBIN_PATH}:$PATH\nexec >>{w}/log/prolog.log 2>&1\nexec {self.prolog}\n"
            )
            wrapper.chmod(0o755)
            lines.append(f"Prolog={wrapper}")
        node_line = (
            f"NodeName={self.node} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.slurmd_port} "
            f"CPUs={self.cpus} RealMemory=1000"
        )
        gres_lines = ["AutoDetect=off"]
        if self.gpus > 0:
            node_line += f" Gres={self.gres}"
            typed = f" Type={self.gpu_type}" if self.gpu_type else ""
            files = make_fake_gpus(w / "dev", self.gpus)
            gres_lines.append(f"NodeName={self.node} Name=gpu{typed} File={files}")
        lines += [node_line, "PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP"]
        self.conf.write_text("\n".join(lines) + "\n")
        (w / "gres.conf").write_text("\n".join(gres_lines) + "\n")
        (w / "cgroup.conf").write_text(CGROUP_CONF)

    def start(self) -> SlurmCluster:
        """Install when needed, write configs, start munged, slurmctld, slurmd; wait for idle."""
        t0 = time.monotonic()
        ensure_slurm()
        if self.state_file.exists() and SlurmCluster.load(self.workdir).leftovers():
            raise RuntimeError(f"a cluster is already up in {self.workdir}; stop it first")
        stale = node_cgroup_dirs(self.node)
        if stale:
            remove_node_cgroups(self.node)
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        while self.slurmd_port == self.ctld_port:
            self.slurmd_port = free_port()
        self.write_config()
        try:
            self._start_munge()
            self.start_slurmctld()
            self.daemons["slurmd"] = spawn(
                "slurmd", [which_program("slurmd") or "slurmd", "-D", "-N", self.node, "-f", str(self.conf)],
                self.workdir / "log" / "slurmd.out", self.env,
            )
            self._save()
            wait_for(self._node_idle, START_TIMEOUT, f"node {self.node} idle", 0.1)
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            if isinstance(exc, (RuntimeError, TimeoutError)):
                raise RuntimeError(f"Slurm cluster did not come up: {exc}\n{tail}") from exc
            raise
        self.start_seconds = time.monotonic() - t0
        logger.info("slurm cluster {} up in {:.2f} s ({})", self.node, self.start_seconds, self.workdir)
        return self

    def _node_idle(self) -> bool:
        self._died("slurmctld", raise_=True)
        self._died("slurmd", raise_=True)
        proc = self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False, timeout=30)
        return proc.stdout.strip() == "idle"

    def stop_slurmctld(self) -> None:
        """Stop the controller (jobs keep running; clients then fail): the fail-safe scenario."""
        daemon = self.daemons.get("slurmctld")
        if daemon is not None:
            daemon.stop()

    def start_slurmctld(self, timeout: float = START_TIMEOUT) -> None:
        """Start the controller (again; it recovers its jobs from StateSaveLocation) and wait for it."""
        daemon = self.daemons.get("slurmctld")
        if daemon is not None and daemon.alive():
            return
        self.daemons["slurmctld"] = spawn(
            "slurmctld", [which_program("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)],
            self.workdir / "log" / "slurmctld.out", self.env,
        )
        self._save()

        def answers() -> bool:
            self._died("slurmctld", raise_=True)
            return self.run(["scontrol", "ping"], check=False, timeout=30).returncode == 0

        wait_for(answers, timeout, "slurmctld to answer", 0.1)

    def stop(self) -> list[str]:
        """Cancel jobs, stop slurmd, slurmctld, munged by PID, remove the node's cgroups; problems."""
        t0 = time.monotonic()
        problems = self._teardown(["slurmd"])
        self.state_file.unlink(missing_ok=True)
        self.stop_seconds = time.monotonic() - t0
        logger.info("slurm cluster {} down in {:.2f} s", self.node, self.stop_seconds)
        return problems

    def status(self) -> dict[str, Any]:
        """Daemons alive, node state and queue, as plain values."""
        alive = {name: d.alive() for name, d in self.daemons.items()}
        info: dict[str, Any] = {"workdir": str(self.workdir), "node": self.node, "gres": self.gres,
                                "slurm_conf": str(self.conf), "daemons": alive}
        if alive.get("slurmctld"):
            info["node_state"] = self.run(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False).stdout.strip()
            info["jobs"] = self.queue()
        return info

    def _save(self) -> None:
        data = {
            "node": self.node, "gpus": self.gpus, "gpu_type": self.gpu_type, "cpus": self.cpus,
            "prolog": self.prolog, "prolog_flags": self.prolog_flags,
            "ctld_port": self.ctld_port, "slurmd_port": self.slurmd_port, "munge_dir": str(self.munge_dir),
            "pids": {name: d.pid for name, d in self.daemons.items()},
        }
        self.state_file.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, workdir: Path) -> SlurmCluster:
        """The cluster described by `workdir/cluster.json` (as written by start), to stop or inspect."""
        path = Path(workdir) / "cluster.json"
        data = json.loads(path.read_text())
        cluster = cls(workdir, data["node"], data["gpus"], data["gpu_type"], data["cpus"],
                      data["prolog"], data["prolog_flags"])
        cluster.ctld_port, cluster.slurmd_port = data["ctld_port"], data["slurmd_port"]
        cluster.daemons = {name: Daemon(name, pid) for name, pid in data["pids"].items()}
        cluster._munge_dir = Path(data["munge_dir"])
        return cluster

    def __enter__(self) -> SlurmCluster:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()
