"""A cgroup of the server's own, so that a stop reaches every process, also those that left its session.

Where the daemon may create cgroups (root, or a delegated cgroup v2 subtree) each server runs in a
fresh cgroup under a parent found once at start-up:

- cgroup v2 with `cgroup.kill` (Linux 5.14+): one write kills every member, new forks included;
- cgroup v2 without it: freeze (`cgroup.freeze`), SIGKILL each member, thaw;
- cgroup v1 `freezer`: FROZEN, SIGKILL each member, THAWED;
- cgroup v1 `pids` (no freezer): SIGKILL the members until none is left (members can only fork into
  the same cgroup, so the loop converges).

Elsewhere `find_parent` returns None and the supervisor falls back to its process group + session +
marker scan. Every path is a parameter, so tests run the discovery on temporary folders.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from exporter_watchdog.act import procs

SELF_MOUNTS = Path("/proc/self/mounts")
SELF_CGROUP = Path("/proc/self/cgroup")
DEFAULT_NAME = "exporter-watchdog"
_FREEZE_WAIT = 1.0  # how long to wait for a freeze to settle before killing anyway


@dataclass(frozen=True)
class CgroupParent:
    """Where server cgroups are created, and how they are killed."""

    path: Path
    kind: str  # "v2", "v1-freezer" or "v1-pids"

    @property
    def has_kill(self) -> bool:
        """True where the kernel offers cgroup.kill (cgroup v2, Linux 5.14+)."""
        return self.kind == "v2" and (self.path / "cgroup.kill").exists()

    def describe(self) -> str:
        """One line for `status` and the log."""
        how = {
            "v2": "cgroup.kill" if self.has_kill else "freeze and kill",
            "v1-freezer": "freeze and kill",
            "v1-pids": "kill every member",
        }[self.kind]
        return f"cgroup {self.kind} {self.path} ({how})"

    def create(self, name: str) -> ServerCgroup:
        """Make the server's own cgroup; OSError when the kernel refuses."""
        path = self.path / name
        path.mkdir(mode=0o755)
        return ServerCgroup(path, self.kind)


@dataclass(frozen=True)
class ServerCgroup:
    """One server's cgroup."""

    path: Path
    kind: str

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def pids(self) -> list[int]:
        """The member pids; [] once the cgroup is gone."""
        try:
            text = self.procs_file.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENODEV):
                return []
            raise
        return [int(x) for x in text.split() if x.isdigit()]

    def members(self, proc_root: Path = procs.PROC) -> list[procs.ProcInfo]:
        """Live members as /proc describes them (zombies left out)."""
        out = []
        for pid in self.pids():
            info = procs.read_proc(pid, proc_root)
            if info is not None and info.alive:
                out.append(info)
        return out

    def kill(self) -> None:
        """SIGKILL every member, forks racing the kill included."""
        if self.kind == "v2" and (self.path / "cgroup.kill").exists():
            _write(self.path / "cgroup.kill", "1")
            return
        frozen = self._freeze(True)
        try:
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)  # a member of our cgroup: its pid is pinned by the cgroup
                except ProcessLookupError:
                    pass
        finally:
            if frozen:
                self._freeze(False)

    def _freeze(self, on: bool) -> bool:
        if self.kind == "v2":
            control, value, settled = self.path / "cgroup.freeze", "1" if on else "0", "frozen 1"
            state = self.path / "cgroup.events"
        elif self.kind == "v1-freezer":
            control, value, settled = self.path / "freezer.state", "FROZEN" if on else "THAWED", "FROZEN"
            state = control
        else:
            return False
        if not control.exists():
            return False
        _write(control, value)
        if on:
            deadline = time.monotonic() + _FREEZE_WAIT
            while time.monotonic() < deadline:
                try:
                    if settled in state.read_text():
                        break
                except OSError:
                    break
                time.sleep(0.002)
        return True

    def remove(self) -> bool:
        """Remove the (empty) cgroup; False while members are left or the kernel refuses."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True


def _write(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _mounts(mounts_file: Path) -> list[tuple[Path, str, set[str]]]:
    """(mount point, fstype, options) of every cgroup mount."""
    out: list[tuple[Path, str, set[str]]] = []
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
            out.append((Path(fields[1].replace("\\040", " ")), fields[2], set(fields[3].split(","))))
    return out


def _own_v2_path(self_cgroup: Path) -> str | None:
    try:
        for line in self_cgroup.read_text().splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    except OSError:
        pass
    return None


def _usable(parent: Path) -> bool:
    """True when we can make (or already have) `parent` and create cgroups in it."""
    try:
        parent.mkdir(mode=0o755, exist_ok=True)
    except OSError:
        return False
    if not os.access(parent, os.W_OK | os.X_OK) or not (parent / "cgroup.procs").exists():
        return False
    probe = parent / f".probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError:
        return False
    return True


def parent_at(path: Path, mounts_file: Path = SELF_MOUNTS) -> CgroupParent:
    """A configured parent folder: its kind comes from the cgroup mount it lies in; ValueError if none."""
    best: tuple[Path, str, set[str]] | None = None
    for mount, fstype, options in _mounts(mounts_file):
        if (path == mount or mount in path.parents) and (best is None or len(str(mount)) > len(str(best[0]))):
            best = (mount, fstype, options)
    if best is None:
        raise ValueError(f"{path} is not inside a cgroup mount")
    _, fstype, options = best
    if fstype == "cgroup2":
        kind = "v2"
    elif "freezer" in options:
        kind = "v1-freezer"
    elif "pids" in options:
        kind = "v1-pids"
    else:
        raise ValueError(f"{path} is in a cgroup v1 hierarchy without the freezer or pids controller")
    if not _usable(path):
        raise ValueError(f"{path}: cannot create cgroups here (not root, or not delegated to this user)")
    return CgroupParent(path, kind)


def find_parent(
    name: str = DEFAULT_NAME,
    mounts_file: Path = SELF_MOUNTS,
    self_cgroup: Path = SELF_CGROUP,
) -> CgroupParent | None:
    """The first place where this process may create server cgroups, in order of preference.

    v2 first, below our own cgroup (a delegated subtree keeps the server in our service's
    accounting), then at the root of the v2 hierarchy (root), then the v1 freezer and pids
    hierarchies (root). None when nothing is writable.
    """
    mounts = _mounts(mounts_file)
    own = _own_v2_path(self_cgroup)
    candidates: list[CgroupParent] = []
    for mount, fstype, _ in mounts:
        if fstype != "cgroup2":
            continue
        if own and own != "/":
            candidates.append(CgroupParent(mount / own.lstrip("/") / name, "v2"))
        candidates.append(CgroupParent(mount / name, "v2"))
    for controller in ("freezer", "pids"):
        for mount, fstype, options in mounts:
            if fstype == "cgroup" and controller in options:
                candidates.append(CgroupParent(mount / name, f"v1-{controller}"))
    for candidate in candidates:
        if candidate.path.parent.is_dir() and _usable(candidate.path):
            return candidate
    return None
