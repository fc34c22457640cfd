"""Real Slurm accounting: MariaDB, slurmdbd and a two-node cluster on loopback, so `sacct` answers.

Debian's slurmdbd stores jobs only in MySQL/MariaDB (accounting_storage/filetxt is gone from 22.05),
so this starts a private mariadbd (its own data dir, a free 127.0.0.1 port), a slurmdbd on another
free port, and slurmctld with two slurmd (`-N n1`, `-N n2`) on one host, each with fake GPUs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

from loguru import logger

from tests.support.slurm_cluster import (
    CGROUP_CONF,
    COMMON_CONF,
    START_TIMEOUT,
    ClusterBase,
    SlurmUnavailable,
    ensure_slurm,
    free_port,
    make_fake_gpus,
    remove_node_cgroups,
    spawn,
    unique_name,
    wait_for,
    which_program,
)

ACCOUNTING_PACKAGES = ("slurmdbd", "mariadb-server")
ACCOUNTING_PROGRAMS = ("slurmdbd", "mariadbd", "mariadb-install-db", "mariadb", "sacct", "sacctmgr")


def ensure_accounting(install: bool = True) -> None:
    """Slurm plus slurmdbd and MariaDB, installed from Debian when missing and root."""
    ensure_slurm(install)
    missing = [p for p in ACCOUNTING_PROGRAMS if which_program(p) is None]
    if missing and install and which_program("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for argv in (["apt-get", "update"],
                     ["apt-get", "install", "-y", "--no-install-recommends", *ACCOUNTING_PACKAGES]):
            subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        missing = [p for p in ACCOUNTING_PROGRAMS if which_program(p) is None]
    if missing:
        raise SlurmUnavailable(f"missing {missing}; install: apt-get install {' '.join(ACCOUNTING_PACKAGES)}")


class AccountedCluster(ClusterBase):
    """mariadbd + slurmdbd + slurmctld + two slurmd with `gpu:a30:4` each, all on loopback."""

    def __init__(self, workdir: Path, gpus: int = 4, gpu_type: str = "a30") -> None:
        super().__init__(workdir)
        self.prefix = unique_name("wa")
        self.nodes = [f"{self.prefix}n1", f"{self.prefix}n2"]
        self.cluster = self.prefix
        self.gpus = gpus
        self.gpu_type = gpu_type
        self.db_port = self.dbd_port = self.ctld_port = 0
        self.slurmd_ports: dict[str, int] = {}
        self.db_dir = self.workdir / "mariadb"
        self._db_password = secrets.token_hex(12)  # lives only in slurmdbd.conf (mode 600) and the SQL pipe

    # -- configuration ------------------------------------------------------------------------
    def _ports(self) -> None:
        taken: set[int] = set()
        for _ in range(3 + len(self.nodes)):
            port = free_port()
            while port in taken:
                port = free_port()
            taken.add(port)
        self.db_port, self.dbd_port, self.ctld_port, *rest = sorted(taken)
        self.slurmd_ports = dict(zip(self.nodes, rest, strict=True))

    def write_config(self) -> None:
        self._dirs()
        w = self.workdir
        host = socket.gethostname().split(".")[0]
        dbd = w / "slurmdbd.conf"
        dbd.write_text("\n".join([
            "AuthType=auth/munge", f"AuthInfo=socket={self.munge_socket}", f"DbdHost={host}", "DbdAddr=127.0.0.1",
            f"DbdPort={self.dbd_port}", "SlurmUser=root", f"PidFile={w}/run/slurmdbd.pid",
            f"LogFile={w}/log/slurmdbd.log", "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
            f"StoragePort={self.db_port}", "StorageUser=slurm", f"StoragePass={self._db_password}",
            "StorageLoc=slurm_acct_db",
        ]) + "\n")
        dbd.chmod(0o600)
        lines = [
            f"ClusterName={self.cluster}", f"SlurmctldHost={host}(127.0.0.1)", f"SlurmctldPort={self.ctld_port}",
            COMMON_CONF.format(sock=self.munge_socket, w=w).replace(
                "AccountingStorageType=accounting_storage/none",
                f"AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=127.0.0.1\n"
                # For slurmdbd connections AccountingStoragePass names the munge socket.
                f"AccountingStoragePort={self.dbd_port}\nAccountingStoragePass={self.munge_socket}\n"
                # GPUs appear in AllocTRES only when tracked; sites that account GPUs set this.
                f"AccountingStorageTRES=gres/gpu,gres/gpu:{self.gpu_type}").rstrip(),
            f"SlurmdSpoolDir={w}/spool/%n", f"SlurmdPidFile={w}/run/slurmd-%n.pid",
            f"SlurmdLogFile={w}/log/slurmd-%n.log",
            "SlurmdParameters=config_overrides", "PrologFlags=Contain",
        ]
        gres = ["AutoDetect=off"]
        for node in self.nodes:
            files = make_fake_gpus(w / "dev" / node, self.gpus)
            gres.append(f"NodeName={node} Name=gpu Type={self.gpu_type} File={files}")
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={self.slurmd_ports[node]} "
                         f"CPUs=2 RealMemory=1000 Gres=gpu:{self.gpu_type}:{self.gpus}")
        lines.append("PartitionName=main Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")
        (w / "gres.conf").write_text("\n".join(gres) + "\n")
        (w / "cgroup.conf").write_text(CGROUP_CONF)

    # -- MariaDB ------------------------------------------------------------------------------
    def _start_db(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)
        sock = self.db_dir / "mysqld.sock"
        subprocess.run([which_program("mariadb-install-db") or "mariadb-install-db", "--no-defaults",
                        f"--datadir={self.db_dir / 'data'}", "--user=root", "--auth-root-authentication-method=socket",
                        "--skip-test-db"], check=True, capture_output=True, timeout=300)
        argv = [which_program("mariadbd") or "mariadbd", "--no-defaults", f"--datadir={self.db_dir / 'data'}",
                f"--socket={sock}", f"--port={self.db_port}", "--bind-address=127.0.0.1", "--user=root",
                f"--pid-file={self.db_dir / 'mysqld.pid'}", f"--log-error={self.workdir / 'log' / 'mariadb.log'}",
                "--skip-log-bin", "--innodb-buffer-pool-size=16M", "--innodb-log-file-size=8M"]
        self.daemons["mariadbd"] = spawn("mariadbd", argv, self.workdir / "log" / "mariadb.out", self.env)
        wait_for(lambda: sock.is_socket() or self._died("mariadbd"), START_TIMEOUT, "mariadb socket")
        self._died("mariadbd", raise_=True)
        sql = (f"CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{self._db_password}';"
               "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;")

        def accepts() -> bool:
            proc = subprocess.run([which_program("mariadb") or "mariadb", "--no-defaults", f"--socket={sock}",
                                   "-u", "root"], input=sql, capture_output=True, text=True, timeout=60)
            return proc.returncode == 0

        wait_for(accepts, START_TIMEOUT, "mariadb to accept the slurm user", 0.2)

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> AccountedCluster:
        t0 = time.monotonic()
        ensure_accounting()
        for node in self.nodes:
            remove_node_cgroups(node)
        self._ports()
        self.write_config()
        try:
            self._start_munge()
            self._start_db()
            self.daemons["slurmdbd"] = spawn("slurmdbd", [which_program("slurmdbd") or "slurmdbd", "-D"],
                                             self.workdir / "log" / "slurmdbd.out", self.env)

            def dbd_answers() -> bool:
                self._died("slurmdbd", raise_=True)
                return self.run(["sacctmgr", "-n", "list", "cluster"], check=False, timeout=30).returncode == 0

            wait_for(dbd_answers, START_TIMEOUT, "slurmdbd to answer", 0.2)
            self.run(["sacctmgr", "-i", "add", "cluster", self.cluster])
            self.daemons["slurmctld"] = spawn(
                "slurmctld", [which_program("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)],
                self.workdir / "log" / "slurmctld.out", self.env)
            wait_for(lambda: self._died("slurmctld", raise_=True)
                     or self.run(["scontrol", "ping"], check=False, timeout=30).returncode == 0,
                     START_TIMEOUT, "slurmctld to answer", 0.1)
            for node in self.nodes:
                (self.workdir / "spool" / node).mkdir(parents=True, exist_ok=True)
                self.daemons[f"slurmd-{node}"] = spawn(
                    "slurmd", [which_program("slurmd") or "slurmd", "-D", "-N", node, "-f", str(self.conf)],
                    self.workdir / "log" / f"slurmd-{node}.out", self.env)
            wait_for(self._all_idle, START_TIMEOUT, f"nodes {self.nodes} idle", 0.1)
        except BaseException as exc:
            tail = self.log_tail()
            self.stop()
            if isinstance(exc, (RuntimeError, TimeoutError)):
                raise RuntimeError(f"accounted Slurm did not come up: {exc}\n{tail}") from exc
            raise
        self.start_seconds = time.monotonic() - t0
        logger.info("accounted slurm {} up in {:.2f} s", self.cluster, self.start_seconds)
        return self

    def _all_idle(self) -> bool:
        for name in self.daemons:
            self._died(name, raise_=True)
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False, timeout=30).stdout
        states = dict(line.split(None, 1) for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in self.nodes)

    def sacct(self, *extra: str) -> str:
        """`sacct -a -P --format=JobID,NodeList,AllocTRES,Start,End,State` in UTC, with `extra` options."""
        env_argv = ["env", "TZ=UTC", "sacct", "-a", "-P", "-S", "2000-01-01",
                    "--format=JobID,NodeList,AllocTRES,Start,End,State", *extra]
        return self.run(env_argv).stdout

    def stop(self) -> list[str]:
        """Jobs, slurmd, slurmctld, slurmdbd, mariadbd, munged; cgroups and the data dir."""
        problems = self._teardown([n for n in self.daemons if n.startswith("slurmd-")])
        for name in ("slurmdbd", "mariadbd"):
            daemon = self.daemons.get(name)
            if daemon is not None:
                try:
                    daemon.stop()
                except RuntimeError as exc:
                    problems.append(str(exc))
        if not any(d.alive() for d in self.daemons.values()):
            shutil.rmtree(self.db_dir, ignore_errors=True)
        return problems
