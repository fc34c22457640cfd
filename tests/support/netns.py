"""Hosts made of network namespaces: a bridge in the head's namespace and a veth pair per worker."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

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

    def wrap(self, host: str, argv: Sequence[str], munge_socket: Path | None = None) -> list[str]:
        """The argv that runs `argv` as if on `host`: its network, hostname and /etc/hosts.

        `nsenter --net` keeps the machine's /sys (so cgroups stay visible), unlike `ip netns exec`.
        Neither nsenter (no PID namespace) nor unshare (no --fork) forks, and the shell execs, so
        the PID of the process started from this argv is the PID of `argv` itself.
        """
        h = self.by_name[host]
        steps = [f"mount --bind {shlex.quote(str(self.hosts_file))} /etc/hosts", f"hostname {h.name}"]
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
