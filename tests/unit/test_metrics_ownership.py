"""Slurm job processes on GPUs: cgroup paths of every Slurm layout, and the per-GPU job map."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from exporter_watchdog.act.procs import read_cgroup
from exporter_watchdog.metrics.nvml import GpuBackendError, GpuErrorKind, GpuProcess
from exporter_watchdog.metrics.ownership import classify_processes, slurm_job_of_cgroup, slurm_job_processes_on


@pytest.mark.parametrize(
    ("lines", "job"),
    [
        # cgroup v1, one line per controller
        (["12:pids:/slurm/uid_1000/job_4711/step_0/task_0", "4:memory:/slurm/uid_1000/job_4711/step_0/task_0",
          "1:name=systemd:/system.slice/slurmd.service"], "4711"),
        # v1 with --enable-multiple-slurmd (Debian's build)
        (["7:devices:/slurm_vm1/uid_0/job_12/step_batch/task_0"], "12"),
        # v2
        (["0::/system.slice/slurmstepd.scope/job_88/step_0/user/task_0"], "88"),
        (["0::/system.slice/slurmstepd.scope/job_88/step_extern/user/task_special"], "88"),
        # v2 with multiple slurmd
        (["0::/system.slice/vm1_slurmstepd.scope/job_9/step_batch/user/task_0"], "9"),
        # v2 from 26.05: the job directory is the SLUID
        (["0::/system.slice/slurmstepd.scope/s5K1KKYAYG5D00/step_0/user/task_0"], "s5K1KKYAYG5D00"),
        # a bare path, as some readers hand it over
        (["/slurm/uid_5/job_3"], "3"),
        # not jobs: slurmstepd itself, slurmd, a login session, a container, the uid level only
        (["0::/system.slice/slurmstepd.scope/system"], None),
        (["0::/system.slice/slurmd.service"], None),
        (["0::/user.slice/user-1000.slice/session-4.scope"], None),
        (["0::/system.slice/docker-0123abcd.scope"], None),
        (["3:cpuset:/slurm/uid_1000"], None),
        (["0::/system.slice/slurmstepd.scope/job_"], None),
        ([], None),
    ],
)
def test_slurm_job_of_cgroup(lines: list[str], job: str | None) -> None:
    assert slurm_job_of_cgroup(lines) == job


class ProcsOnly:
    """Only the process-list part of the GPU interface, which is all slurm_job_processes_on reads."""

    def __init__(self, procs: dict[int, list[int]], broken: dict[int, GpuBackendError]) -> None:
        self.procs = procs
        self.broken = broken

    def compute_processes(self, gpu: int) -> list[GpuProcess]:
        if gpu in self.broken:
            raise self.broken[gpu]
        return [GpuProcess(pid, 1 << 30) for pid in self.procs.get(gpu, [])]


def test_slurm_job_processes_on_maps_jobs_to_gpus() -> None:
    backend = ProcsOnly(
        procs={0: [10, 20], 1: [21, 30], 2: [40], 3: [50], 4: [20]},
        broken={3: GpuBackendError("GPU is lost", GpuErrorKind.LOST)},
    )
    table = {
        10: ["0::/system.slice/my-llm.service"],  # not a job
        20: ["0::/system.slice/slurmstepd.scope/job_5/step_0/user/task_0"],
        21: ["0::/system.slice/slurmstepd.scope/job_5/step_1/user/task_0"],
        30: ["0::/system.slice/slurmstepd.scope/job_6/step_0/user/task_0"],
        50: ["0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0"],
        # 40 has gone
    }
    found = slurm_job_processes_on(backend, [0, 1, 2, 3], table.get)  # type: ignore[arg-type]
    assert found == {"5": {0, 1}, "6": {1}}  # GPU 4 not asked for; GPU 3 unreadable is skipped


def test_classify_processes() -> None:
    table = {2: ["0::/system.slice/slurmstepd.scope/job_1/step_0/user/task_0"], 3: ["0::/init.scope"]}
    occ = classify_processes([GpuProcess(1, None), GpuProcess(2, None), GpuProcess(3, None), GpuProcess(4, None)],
                             {1}, table.get)
    assert occ.server == (1,)
    assert dict(occ.slurm) == {2: "1"}
    assert occ.foreign == (3, 4)


def test_real_proc_reader_classifies_a_real_process() -> None:
    # A real child process: its cgroup is whatever this machine gives it, which is no Slurm job.
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lines = read_cgroup(child.pid)
        assert lines, "a live process has a cgroup"
        assert slurm_job_of_cgroup(lines) is None
        occ = classify_processes([GpuProcess(child.pid, None), GpuProcess(os.getpid(), None)], {os.getpid()},
                                 read_cgroup)
        assert occ.foreign == (child.pid,)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    assert read_cgroup(child.pid) is None  # reaped: gone


def test_proc_fixture_with_a_slurm_job(tmp_path: Path) -> None:
    # The same reader over a /proc-shaped folder, as a job's process would look on a v2 node.
    (tmp_path / "4242").mkdir()
    (tmp_path / "4242" / "cgroup").write_text("0::/system.slice/slurmstepd.scope/job_314/step_0/user/task_0\n")
    lines = read_cgroup(4242, proc_root=tmp_path)
    assert lines is not None and slurm_job_of_cgroup(lines) == "314"
