"""Who runs the processes on each GPU: our server, a Slurm job (by its cgroup), or someone else."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from loguru import logger

from exporter_watchdog.act.procs import read_cgroup as read_proc_cgroup
from exporter_watchdog.metrics.nvml import GpuBackend, GpuBackendError, GpuProcess

CgroupReader = Callable[[int], "list[str] | None"]

# v1: /slurm/uid_U/job_N/... ; builds with --enable-multiple-slurmd use /slurm_<node>/uid_U/job_N/...
_V1_JOB = re.compile(r"/slurm(?:_[^/]+)?/uid_\d+/job_(\d+)(?:/|$)")
# v2: .../[<node>_]slurmstepd.scope/job_N/... ; from 26.05 the job directory is the job's SLUID
# (`s` + 13 Crockford base32 characters), which also keeps `slurmstepd.scope/system` (the stepd) out.
_V2_JOB = re.compile(r"slurmstepd\.scope/(?:job_(\d+)|(s[0-9A-Z]{13}))(?:/|$)")


def slurm_job_of_cgroup(lines: Iterable[str]) -> str | None:
    """The Slurm job id (or SLUID) a process belongs to, from its /proc/PID/cgroup lines; None if none."""
    for line in lines:
        # `hierarchy:controllers:path`; a bare path is accepted too.
        path = line.split(":", 2)[2] if line.count(":") >= 2 else line
        match = _V2_JOB.search(path)
        if match:
            return match.group(1) or match.group(2)
        match = _V1_JOB.search(path)
        if match:
            return match.group(1)
    return None


def slurm_job_processes_on(
    backend: GpuBackend, gpus: Iterable[int], read_cgroup: CgroupReader = read_proc_cgroup
) -> dict[str, set[int]]:
    """Slurm job id -> the GPUs (among `gpus`) where a process of that job runs."""
    found: dict[str, set[int]] = {}
    for gpu in gpus:
        try:
            procs = backend.compute_processes(gpu)
        except GpuBackendError as exc:
            logger.debug("GPU {}: process list unavailable: {}", gpu, exc)
            continue
        for proc in procs:
            lines = read_cgroup(proc.pid)
            job = slurm_job_of_cgroup(lines) if lines else None
            if job is not None:
                found.setdefault(job, set()).add(gpu)
    return found


@dataclass(frozen=True)
class GpuOccupants:
    """The processes on one GPU, sorted by whose they are."""

    server: tuple[int, ...] = ()
    slurm: Mapping[int, str] = field(default_factory=dict)  # pid -> job id
    foreign: tuple[int, ...] = ()


def classify_processes(
    procs: Iterable[GpuProcess], server_pids: set[int], read_cgroup: CgroupReader
) -> GpuOccupants:
    """Split a GPU's processes into ours, Slurm jobs' and foreign ones."""
    server: list[int] = []
    slurm: dict[int, str] = {}
    foreign: list[int] = []
    for proc in procs:
        if proc.pid in server_pids:
            server.append(proc.pid)
            continue
        lines = read_cgroup(proc.pid)
        job = slurm_job_of_cgroup(lines) if lines else None
        if job is not None:
            slurm[proc.pid] = job
        else:
            # A PID we cannot see (gone, or another PID namespace) counts as foreign: we cannot vouch for it.
            foreign.append(proc.pid)
    return GpuOccupants(server=tuple(server), slurm=slurm, foreign=tuple(foreign))
