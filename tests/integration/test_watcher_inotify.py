"""CgroupWatcher with real inotify (and polling) on temp dirs for every layout, and against a real Slurm."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from exporter_watchdog.detect.runner import run_command
from exporter_watchdog.detect.scontrol import SlurmClient
from exporter_watchdog.detect.watcher import CgroupWatcher
from tests.conftest_slurm import slurm_cluster, slurm_cluster_module  # noqa: F401  (fixtures)
from tests.integration.conftest_watcher import WakeCounter, no_thread_leaks, wait_until  # noqa: F401
from tests.support.slurm_cluster import CGROUP_ROOT, SlurmCluster

NODE = "gpu-n1"
SLUID = "s5K1KKYAYG5D00"

pytestmark = pytest.mark.usefixtures("no_thread_leaks")

# (name, the Slurm root that exists before the first job, the job parent below the cgroup root)
LAYOUTS = [
    ("v1 slurm", "freezer/slurm", "freezer/slurm/uid_1000"),
    ("v1 slurm_node", f"freezer/slurm_{NODE}", f"freezer/slurm_{NODE}/uid_0"),
    ("v1 new uid", f"cpuset/slurm_{NODE}", f"cpuset/slurm_{NODE}/uid_4242"),
    ("v2 scope", "system.slice/slurmstepd.scope", "system.slice/slurmstepd.scope"),
    ("v2 node scope", f"system.slice/{NODE}_slurmstepd.scope", f"system.slice/{NODE}_slurmstepd.scope"),
    ("v2 hybrid", "unified/system.slice/slurmstepd.scope", "unified/system.slice/slurmstepd.scope"),
    ("v2 CgroupSlice", "hpc.slice/hpc-jobs.slice/slurmstepd.scope", "hpc.slice/hpc-jobs.slice/slurmstepd.scope"),
]


def job_name(layout: str, n: int) -> str:
    """job_N, or a SLUID-like name on v2 so both kinds of names are exercised."""
    return f"s{n:013d}" if layout.startswith("v2") and n % 2 else f"job_{n}"


def job_id(name: str) -> str:
    return name.removeprefix("job_")


def make_job(parent: Path, name: str) -> Path:
    """Create a job the way slurmstepd does: the job directory, then its steps and tasks."""
    job = parent / name
    job.mkdir(parents=True)
    for step in ("step_extern", "step_batch"):
        (job / step / "task_0").mkdir(parents=True)
    return job


def remove_job(job: Path) -> None:
    """rmdir bottom-up, as on cgroupfs where a non-empty directory cannot be removed."""
    for dirpath, _, _ in sorted(os.walk(job), key=lambda w: -len(w[0])):
        os.rmdir(dirpath)


@pytest.fixture
def watchers() -> Iterator[Callable[..., CgroupWatcher]]:
    """Start watchers with any arguments; all are stopped after the test."""
    made: list[CgroupWatcher] = []

    def start(root: Path, wake: Callable[[], None], **kwargs: object) -> CgroupWatcher:
        watcher = CgroupWatcher(root, NODE, wake, **kwargs)  # type: ignore[arg-type]
        made.append(watcher)
        watcher.start()
        return watcher

    yield start
    for watcher in made:
        watcher.stop()


@pytest.mark.parametrize("mode", ["inotify", "poll"])
@pytest.mark.parametrize(("name", "slurm_root", "parent"), LAYOUTS, ids=[lay[0] for lay in LAYOUTS])
def test_job_creation_and_deletion_wake(
    tmp_path: Path, watchers: Callable[..., CgroupWatcher], mode: str, name: str, slurm_root: str, parent: str
) -> None:
    (tmp_path / slurm_root).mkdir(parents=True)
    wake = WakeCounter()
    watcher = watchers(tmp_path, wake, mode=mode, poll_interval=0.05)
    assert watcher.mode == mode
    for n in (11, 12):
        check_job_comes_and_goes(tmp_path / parent, job_name(name, n), watcher, wake)


def check_job_comes_and_goes(
    parent: Path, name: str, watcher: CgroupWatcher, wake: WakeCounter, forget: bool = True
) -> None:
    """Create a job: first_seen and a wake; remove it: another wake; first_seen stays until forget()."""
    jid = job_id(name)
    before, woken = time.monotonic(), wake.count
    job = make_job(parent, name)
    seen = wait_until(lambda: watcher.first_seen(jid), f"first_seen of {name}")
    assert before <= seen <= time.monotonic()
    wait_until(lambda: wake.count > woken, f"wake for {name}")
    woken_after_create = wake.count
    remove_job(job)
    wait_until(lambda: wake.count > woken_after_create, f"wake for the removal of {name}")
    if forget:
        assert watcher.first_seen(jid) == seen
        watcher.forget([jid])
        assert watcher.first_seen(jid) is None


# (name, what exists at start, the job parent created later in one go)
LATE_LAYOUTS = [
    ("v1 cpuset at the first job", ("cpuset", "freezer"), f"cpuset/slurm_{NODE}/uid_0"),
    ("v1 slurm root and uid at once", ("memory",), "memory/slurm/uid_7"),
    ("v2 slice and scope at once", (), "system.slice/slurmstepd.scope"),
    ("v2 scope in an existing slice", ("system.slice",), f"system.slice/{NODE}_slurmstepd.scope"),
    ("v2 hybrid", ("unified",), "unified/system.slice/slurmstepd.scope"),
    ("v2 nested slice", ("hpc.slice",), "hpc.slice/hpc-a.slice/slurmstepd.scope"),
]


@pytest.mark.parametrize(("name", "existing", "parent"), LATE_LAYOUTS, ids=[lay[0] for lay in LATE_LAYOUTS])
def test_a_layout_that_appears_after_start(
    tmp_path: Path, watchers: Callable[..., CgroupWatcher], name: str, existing: tuple[str, ...], parent: str
) -> None:
    for d in existing:
        (tmp_path / d).mkdir(parents=True)
    wake = WakeCounter()
    watcher = watchers(tmp_path, wake)
    # The whole path at once: the job exists before any watch on its parents can be added.
    make_job(tmp_path / parent, "job_1")
    wait_until(lambda: watcher.first_seen("1"), "the job under a new parent")
    wait_until(lambda: wake.count >= 1, "a wake")
    # The new parent is now watched itself: a second job there is an ordinary event.
    make_job(tmp_path / parent, "job_2")
    wait_until(lambda: watcher.first_seen("2"), "a second job under the new parent")


def test_a_slurm_root_removed_and_made_again(tmp_path: Path, watchers: Callable[..., CgroupWatcher]) -> None:
    root = tmp_path / "freezer" / f"slurm_{NODE}"
    root.mkdir(parents=True)
    wake = WakeCounter()
    watcher = watchers(tmp_path, wake)
    make_job(root / "uid_0", "job_1")
    wait_until(lambda: watcher.first_seen("1"), "job 1")
    shutil.rmtree(root)  # a temp dir, not cgroupfs: rmtree is fine
    make_job(root / "uid_0", "job_2")
    wait_until(lambda: watcher.first_seen("2"), "job 2 under the re-created root")
    make_job(root / "uid_0", "job_3")
    wait_until(lambda: watcher.first_seen("3"), "job 3 through the new watch")


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_jobs_present_at_start_are_recorded_at_start(
    tmp_path: Path, watchers: Callable[..., CgroupWatcher], mode: str
) -> None:
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0", "job_3")
    make_job(tmp_path / "system.slice" / "slurmstepd.scope", SLUID)
    before = time.monotonic()
    watcher = watchers(tmp_path, WakeCounter(), mode=mode)
    after = time.monotonic()
    for jid in ("3", SLUID):
        seen = watcher.first_seen(jid)
        assert seen is not None and before <= seen <= after


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_first_seen_uses_the_given_clock_and_keeps_the_earliest(
    tmp_path: Path, watchers: Callable[..., CgroupWatcher], mode: str
) -> None:
    for controller in ("freezer", "cpuset"):
        (tmp_path / controller / f"slurm_{NODE}" / "uid_0").mkdir(parents=True)
    ticks = itertools.count(1000)
    lock = threading.Lock()

    def clock() -> float:
        with lock:
            return float(next(ticks))

    watcher = watchers(tmp_path, WakeCounter(), mode=mode, clock=clock, poll_interval=0.05)
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0", "job_5")
    first = wait_until(lambda: watcher.first_seen("5"), "job 5")
    assert first >= 1000
    # The same job in another controller, then a later job in that same directory: once the later
    # one is seen, the duplicate has been handled and must not have moved job 5's time.
    make_job(tmp_path / "cpuset" / f"slurm_{NODE}" / "uid_0", "job_5")
    make_job(tmp_path / "cpuset" / f"slurm_{NODE}" / "uid_0", "job_6")
    assert wait_until(lambda: watcher.first_seen("6"), "job 6") > first
    assert watcher.first_seen("5") == first


def test_other_nodes_jobs_are_ignored(tmp_path: Path, watchers: Callable[..., CgroupWatcher]) -> None:
    (tmp_path / "freezer").mkdir()
    (tmp_path / "system.slice").mkdir()
    watcher = watchers(tmp_path, WakeCounter())
    make_job(tmp_path / "freezer" / "slurm_other" / "uid_0", "job_1")
    make_job(tmp_path / "system.slice" / "other_slurmstepd.scope", "job_2")
    make_job(tmp_path / "system.slice" / "slurmstepd.scope" / "system", "job_3")  # below a non-job dir
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0", "job_4")
    wait_until(lambda: watcher.first_seen("4"), "our job")
    # job_3's own events may still be in flight; the other node's jobs were never watched
    assert watcher.first_seen("1") is None and watcher.first_seen("2") is None
    assert watcher.first_seen("system") is None


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_many_jobs_in_a_burst(tmp_path: Path, watchers: Callable[..., CgroupWatcher], mode: str) -> None:
    parent = tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0"
    parent.mkdir(parents=True)
    watcher = watchers(tmp_path, WakeCounter(), mode=mode, poll_interval=0.05)
    for n in range(200):
        make_job(parent, f"job_{n}")
    wait_until(lambda: all(watcher.first_seen(str(n)) for n in range(200)), "all 200 jobs")


@pytest.mark.parametrize("mode", ["inotify", "poll"])
def test_a_failing_wake_does_not_stop_the_watcher(
    tmp_path: Path, watchers: Callable[..., CgroupWatcher], mode: str
) -> None:
    parent = tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0"
    parent.mkdir(parents=True)
    calls = WakeCounter()

    def wake() -> None:
        calls()
        raise RuntimeError("daemon hiccup")

    watcher = watchers(tmp_path, wake, mode=mode, poll_interval=0.05)
    make_job(parent, "job_1")
    wait_until(lambda: calls.count >= 1, "the first wake")
    make_job(parent, "job_2")
    wait_until(lambda: watcher.first_seen("2"), "a job after the failing wake")
    wait_until(lambda: calls.count >= 2, "the second wake")


def test_first_seen_of_jobs_long_gone_is_bounded(tmp_path: Path, watchers: Callable[..., CgroupWatcher]) -> None:
    parent = tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0"
    parent.mkdir(parents=True)
    wake = WakeCounter()
    watcher = watchers(tmp_path, wake, mode="poll", poll_interval=0.02, max_remembered=3)
    for n in range(10):  # jobs that come and go without the daemon ever forgetting them
        check_job_comes_and_goes(parent, f"job_{n}", watcher, wake, forget=False)
    remembered = [n for n in range(10) if watcher.first_seen(str(n)) is not None]
    assert len(remembered) <= 3 and 9 in remembered


def test_bad_arguments_and_double_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fanotify"):
        CgroupWatcher(tmp_path, NODE, WakeCounter(), mode="fanotify")
    with pytest.raises(ValueError, match="poll interval"):
        CgroupWatcher(tmp_path, NODE, WakeCounter(), mode="poll", poll_interval=0)
    watcher = CgroupWatcher(tmp_path, NODE, WakeCounter(), mode="poll")
    watcher.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            watcher.start()
    finally:
        watcher.stop()
    watcher.stop()  # stopping twice is harmless


def test_stop_before_start_is_harmless(tmp_path: Path) -> None:
    CgroupWatcher(tmp_path, NODE, WakeCounter()).stop()


# --- a real Slurm: real job cgroups under /sys/fs/cgroup, real scontrol -------------------------------


@pytest.mark.slurm
def test_real_slurm_jobs_are_seen_and_their_gpus_read(
    slurm_cluster: SlurmCluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))  # run_command passes the environment through
    wake = WakeCounter()
    watcher = CgroupWatcher(CGROUP_ROOT, cluster.node, wake)
    watcher.start()
    try:
        client = SlurmClient(["scontrol"], cluster.node, run_command, timeout=30.0)
        out = cluster.workdir / "out"
        gpu_job = cluster.sbatch("a30:2", command=f"echo $SLURM_JOB_GPUS > {out}/gpus.$SLURM_JOB_ID; sleep 300")
        wait_until(lambda: watcher.first_seen(gpu_job), f"job {gpu_job}'s cgroup", timeout=60.0)
        query = client.query_job(gpu_job)
        # Slurm's own view inside the job is the ground truth
        told = wait_until(lambda: _read(out / f"gpus.{gpu_job}"), "SLURM_JOB_GPUS", timeout=60.0)
        assert query.error is None and query.state == "RUNNING"
        assert query.gpus == frozenset(int(i) for i in told.split(","))
        assert len(query.gpus) == 2

        cpu_job = cluster.sbatch(None)
        wait_until(lambda: watcher.first_seen(cpu_job), f"job {cpu_job}'s cgroup", timeout=60.0)
        cpu_query = client.query_job(cpu_job)
        assert cpu_query.error is None and cpu_query.gpus == frozenset()

        woken = wake.count
        cluster.cancel(gpu_job)
        wait_until(lambda: wake.count > woken, "a wake when the job's cgroup goes", timeout=60.0)
        wait_until(lambda: cluster.job_cgroup_dir(gpu_job) is None, "the cgroup removed", timeout=60.0)
    finally:
        watcher.stop()


@pytest.mark.slurm
def test_real_slurm_without_controller_is_unknown(
    slurm_cluster: SlurmCluster,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = slurm_cluster
    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    job = cluster.sbatch("a30:1")
    cluster.wait_job_cgroup(job)
    cluster.stop_slurmctld()
    try:
        query = SlurmClient(["scontrol"], cluster.node, run_command, timeout=1.0).query_job(job)
        assert query.gpus is None
        assert query.error is not None and ("timed out" in query.error or "controller" in query.error)
    finally:
        cluster.start_slurmctld()


def _read(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return text or None
