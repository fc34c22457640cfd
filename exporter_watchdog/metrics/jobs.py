"""Which Slurm jobs hold which GPUs, for dcgm-exporter's `hpc_job` label: the daemon's own job map (from
its snapshot) and dcgm-exporter's job-mapping directory, plus exporter_watchdog_gpu_job_info."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loguru import logger
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from exporter_watchdog.core.model import Snapshot

PREFIX = "exporter_watchdog"
# dcgm-exporter's file names: a GPU index (`0`) or, for a MIG instance, `<GPU>.<GPU instance id>` (`2.1`).
_MAPPING_FILE = re.compile(r"^\d+(\.\d+)?$")
# A file with more lines than this is not a job list; read no further (bounded series).
_MAX_JOBS_PER_FILE = 64
_MAX_LINE = 128


@dataclass(frozen=True)
class GpuJob:
    """A job on a GPU (or MIG instance) key; user and partition are empty when only a mapping file named it."""

    job_id: str
    user: str = ""
    partition: str = ""


JobsByGpu = Mapping[str, tuple[GpuJob, ...]]


def snapshot_jobs(snap: Snapshot) -> dict[str, tuple[GpuJob, ...]]:
    """GPU key -> the jobs the daemon knows hold it (jobs whose GPUs Slurm did not tell are left out)."""
    out: dict[str, dict[str, GpuJob]] = {}
    for job in snap.jobs:
        if not job.gpus:
            continue
        info = GpuJob(job.job_id, job.user or "", job.partition or "")
        for gpu in sorted(job.gpus):
            known = out.setdefault(str(gpu), {})
            if job.job_id not in known or not known[job.job_id].user:
                known[job.job_id] = info
    return {key: tuple(jobs.values()) for key, jobs in out.items()}


def read_mapping_dir(path: Path) -> dict[str, tuple[GpuJob, ...]]:
    """dcgm-exporter's --hpc-job-mapping-dir: one file per GPU key, one job id a line; {} when the folder is gone."""
    out: dict[str, tuple[GpuJob, ...]] = {}
    try:
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return {}
    for entry in entries:
        if not _MAPPING_FILE.match(entry.name) or not entry.is_file():
            continue
        try:
            with open(entry.path, errors="replace") as fh:
                lines = fh.read(_MAX_JOBS_PER_FILE * (_MAX_LINE + 1)).splitlines()
        except OSError as exc:  # a prolog rewriting the file right now: skip it this pass
            logger.debug("job mapping {}: {}", entry.path, exc)
            continue
        ids = [line.strip() for line in lines if line.strip() and len(line.strip()) <= _MAX_LINE]
        ids = ids[:_MAX_JOBS_PER_FILE]
        if ids:
            out[entry.name] = tuple(GpuJob(job_id) for job_id in dict.fromkeys(ids))
    return out


def merge(*maps: JobsByGpu) -> dict[str, tuple[GpuJob, ...]]:
    """Union per GPU key; a job named twice keeps the entry that knows its user."""
    out: dict[str, dict[str, GpuJob]] = {}
    for mapping in maps:
        for key, jobs in mapping.items():
            known = out.setdefault(key, {})
            for job in jobs:
                if job.job_id not in known or (job.user and not known[job.job_id].user):
                    known[job.job_id] = job
    return {key: tuple(jobs.values()) for key, jobs in out.items() if jobs}


class JobMap:
    """The `jobs` callable for the collectors: the daemon's snapshot and/or a mapping directory, merged."""

    def __init__(self, snapshot: Callable[[], Snapshot] | None = None, mapping_dir: Path | None = None) -> None:
        self._snapshot = snapshot
        self._mapping_dir = mapping_dir
        self._dir_failing = False

    def __call__(self) -> dict[str, tuple[GpuJob, ...]]:
        maps: list[JobsByGpu] = []
        if self._snapshot is not None:
            maps.append(snapshot_jobs(self._snapshot()))
        if self._mapping_dir is not None:
            try:
                maps.append(read_mapping_dir(self._mapping_dir))
                self._dir_failing = False
            except OSError as exc:
                if not self._dir_failing:
                    logger.warning("metrics.hpc_job_mapping_dir {}: {}", self._mapping_dir, exc)
                self._dir_failing = True
        return merge(*maps)


def gpu_of(key: str) -> int:
    """The GPU index of a key (`2` or `2.1`)."""
    return int(key.split(".", 1)[0])


class JobInfoCollector(Collector):
    """exporter_watchdog_gpu_job_info{gpu,hpc_job,user,partition} 1 for every job on a GPU now (bounded)."""

    def __init__(self, jobs: Callable[[], JobsByGpu]) -> None:
        self._jobs = jobs

    def collect(self) -> Iterable[Metric]:
        family = GaugeMetricFamily(
            f"{PREFIX}_gpu_job_info", "1 for each Slurm job that holds a GPU now, with its user and partition.",
            labels=["gpu", "hpc_job", "user", "partition"],
        )
        seen: set[tuple[int, str]] = set()
        for key, jobs in sorted(self._jobs().items(), key=lambda kv: (gpu_of(kv[0]), kv[0])):
            gpu = gpu_of(key)
            for job in jobs:
                if (gpu, job.job_id) not in seen:  # a job on two MIG instances of one GPU: one series
                    seen.add((gpu, job.job_id))
                    family.add_metric([str(gpu), job.job_id, job.user, job.partition], 1.0)
        yield family
