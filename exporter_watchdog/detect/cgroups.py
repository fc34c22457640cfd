"""Where Slurm puts a job's cgroup, for every layout: cgroup v1 and v2, with and without multiple slurmd.

v1:  <root>/<controller>/slurm/uid_U/job_N/...          (or slurm_<node> with --enable-multiple-slurmd)
v2:  <root>/[unified/]<slice>.slice/slurmstepd.scope/job_N/...   (or <node>_slurmstepd.scope; from
     26.05 the job directory is the job's SLUID unless CgroupJobIdPaths=yes; CgroupSlice moves the
     scope into another slice, possibly nested one level like a-b.slice inside a.slice)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LAYOUT_V1 = "v1"  # <controller>/slurm/uid_U/job_N
LAYOUT_V1_NODE = "v1-node"  # <controller>/slurm_<node>/uid_U/job_N
LAYOUT_V2 = "v2"  # <slice>/slurmstepd.scope/job_N
LAYOUT_V2_NODE = "v2-node"  # <slice>/<node>_slurmstepd.scope/job_N

UNIFIED = "unified"  # where a hybrid (v1 + v2) host mounts cgroup2
_JOB_NUMBER = re.compile(r"^job_(\d+)$")
# A SLUID is "s" and upper-case base32 (s5K1KKYAYG5D00); the scope's own "system" is lower-case.
_SLUID = re.compile(r"^s[0-9A-Z]{8,24}$")
_UID = re.compile(r"^uid_\d+$")


@dataclass(frozen=True)
class JobDir:
    """A job's cgroup directory; job_id is "123" for job_123, or the SLUID for a v2 SLUID directory."""

    job_id: str
    path: Path
    layout: str


@dataclass(frozen=True)
class WatchPlan:
    """Existing directories to watch: `recursive` hold jobs below them, `shallow` are their parents."""

    recursive: tuple[Path, ...]
    shallow: tuple[Path, ...]


def job_id_from_name(name: str) -> str | None:
    """The job id a job directory name stands for (job_123 -> "123", a SLUID -> itself), else None."""
    match = _JOB_NUMBER.match(name)
    if match is not None:
        return match.group(1)
    if _SLUID.match(name):
        return name
    return None


def v1_root_names(node: str) -> tuple[str, ...]:
    """Names of the Slurm directory inside a v1 controller."""
    return ("slurm", f"slurm_{node}")


def scope_names(node: str) -> tuple[str, ...]:
    """Names of slurmstepd's v2 scope inside a slice."""
    return ("slurmstepd.scope", f"{node}_slurmstepd.scope")


def _subdirs(path: Path) -> Iterator[os.DirEntry[str]]:
    """Child directories of path; a path that is missing or vanishing yields nothing."""
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        yield entry
                except OSError:
                    continue
    except OSError:
        return


def _is_v1_controller(name: str) -> bool:
    return name != UNIFIED and not name.endswith((".slice", ".scope"))


def _v2_bases(cgroup_root: Path) -> list[Path]:
    """The cgroup2 hierarchies to look in: the root itself and a hybrid host's unified mount."""
    bases = [cgroup_root]
    unified = cgroup_root / UNIFIED
    if unified.is_dir():
        bases.append(unified)
    return bases


def _slices(base: Path) -> list[Path]:
    """Slices at the top of a cgroup2 hierarchy, and the systemd-nested ones one level below them."""
    found: list[Path] = []
    for entry in _subdirs(base):
        if not entry.name.endswith(".slice"):
            continue
        found.append(Path(entry.path))
        stem = entry.name[: -len(".slice")]
        for child in _subdirs(Path(entry.path)):
            if child.name.endswith(".slice") and child.name.startswith(f"{stem}-"):
                found.append(Path(child.path))
    return found


def _v1_roots(cgroup_root: Path, node: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """v1 controller directories, and the existing Slurm directories inside them with their layout."""
    controllers: list[Path] = []
    roots: list[tuple[Path, str]] = []
    if (cgroup_root / "cgroup.controllers").exists():
        # A cgroup2 root: its children are slices, scopes and mounts, never v1 controllers.
        return controllers, roots
    # freezer first: it exists from slurmd start, so its path is the one reported for a job.
    entries = sorted(_subdirs(cgroup_root), key=lambda e: (e.name != "freezer", e.name))
    for entry in entries:
        if not _is_v1_controller(entry.name):
            continue
        controllers.append(Path(entry.path))
        for name, layout in zip(v1_root_names(node), (LAYOUT_V1, LAYOUT_V1_NODE), strict=True):
            candidate = Path(entry.path) / name
            if candidate.is_dir():
                roots.append((candidate, layout))
    return controllers, roots


def _v2_scopes(cgroup_root: Path, node: str) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Slices that may hold slurmstepd's scope, and the existing scopes with their layout."""
    slices: list[Path] = []
    scopes: list[tuple[Path, str]] = []
    for base in _v2_bases(cgroup_root):
        for slice_dir in _slices(base):
            slices.append(slice_dir)
            for name, layout in zip(scope_names(node), (LAYOUT_V2, LAYOUT_V2_NODE), strict=True):
                candidate = slice_dir / name
                if candidate.is_dir():
                    scopes.append((candidate, layout))
    return slices, scopes


def _parents_with_layout(cgroup_root: Path, node: str) -> list[tuple[Path, str]]:
    parents: list[tuple[Path, str]] = []
    _, v1_roots = _v1_roots(cgroup_root, node)
    for root, layout in v1_roots:
        parents.extend((Path(e.path), layout) for e in _subdirs(root) if _UID.match(e.name))
    _, scopes = _v2_scopes(cgroup_root, node)
    parents.extend(scopes)
    return parents


def job_parent_dirs(cgroup_root: Path, node: str) -> list[Path]:
    """The existing directories whose children are job directories, for every layout."""
    return [path for path, _ in _parents_with_layout(cgroup_root, node)]


def watch_plan(cgroup_root: Path, node: str) -> WatchPlan:
    """Directories to watch recursively (Slurm roots, scopes) and shallowly (where those can appear)."""
    if not cgroup_root.is_dir():
        return WatchPlan((), ())
    controllers, v1_roots = _v1_roots(cgroup_root, node)
    slices, scopes = _v2_scopes(cgroup_root, node)
    recursive = [path for path, _ in v1_roots] + [path for path, _ in scopes]
    # A controller gets slurm_<node> at the first job (cpuset, devices), a slice gets the scope at
    # slurmd start, the root or unified mount gets a new slice; watching them shallowly costs one
    # watch each and catches those directories as they appear.
    shallow = [cgroup_root, *controllers]
    shallow += [base for base in _v2_bases(cgroup_root) if base != cgroup_root]
    shallow += slices
    return WatchPlan(tuple(recursive), tuple(dict.fromkeys(shallow)))


def watch_roots(cgroup_root: Path, node: str) -> list[Path]:
    """The recursive watch roots followed by the parents to watch shallowly (see watch_plan)."""
    plan = watch_plan(cgroup_root, node)
    return [*plan.recursive, *plan.shallow]


def scan_jobs(cgroup_root: Path, node: str) -> dict[str, JobDir]:
    """Every job directory of every layout, one entry per job (v1 controllers repeat the same job)."""
    jobs: dict[str, JobDir] = {}
    for parent, layout in _parents_with_layout(cgroup_root, node):
        for entry in _subdirs(parent):
            job_id = job_id_from_name(entry.name)
            if job_id is not None and job_id not in jobs:
                jobs[job_id] = JobDir(job_id=job_id, path=Path(entry.path), layout=layout)
    return jobs


def job_id_from_path(path: Path, cgroup_root: Path, node: str) -> str | None:
    """The job a path belongs to (the job directory or anything below it), from its name alone."""
    try:
        parts = Path(path).relative_to(cgroup_root).parts
    except ValueError:
        return None
    index = _job_part_index(parts, node)
    return job_id_from_name(parts[index]) if index is not None else None


def is_job_dir(path: Path, cgroup_root: Path, node: str) -> bool:
    """Whether path is a job directory itself (not a step or task below one)."""
    try:
        parts = Path(path).relative_to(cgroup_root).parts
    except ValueError:
        return False
    index = _job_part_index(parts, node)
    return index is not None and index == len(parts) - 1 and job_id_from_name(parts[index]) is not None


def _job_part_index(parts: tuple[str, ...], node: str) -> int | None:
    """Index of the job directory's name in parts, by the layout the parts spell."""
    # v1: <controller>/<slurm|slurm_node>/uid_U/<job>
    if (
        len(parts) >= 4
        and _is_v1_controller(parts[0])
        and parts[1] in v1_root_names(node)
        and _UID.match(parts[2])
    ):
        return 3
    # v2: [unified/]<a.slice>[/<a-b.slice>]/<scope>/<job>
    i = 1 if parts and parts[0] == UNIFIED else 0
    slices = 0
    while i < len(parts) and parts[i].endswith(".slice") and slices < 2:
        i += 1
        slices += 1
    if slices and i + 1 < len(parts) and parts[i] in scope_names(node):
        return i + 1
    return None
