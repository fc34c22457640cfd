"""The project's test Slurm: real slurmctld/slurmd, fake GPUs, real job cgroups, several hosts."""

from __future__ import annotations

import queue
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from tests.conftest_slurm import require_slurm
from tests.support.netns import SlurmMultiNode
from tests.support.slurm_cluster import (
    CGROUP_ROOT,
    SlurmCluster,
    SlurmUnavailable,
    cgroup_pids,
    wait_for,
)

IDX = re.compile(r"IDX:([0-9,-]+)\)")


def indices(gres: str) -> set[int]:
    """GPU indices of a GRES detail such as gpu:a30:2(IDX:0,2-3)."""
    match = IDX.search(gres)
    assert match, f"no IDX in {gres!r}"
    found: set[int] = set()
    for part in match.group(1).split(","):
        lo, _, hi = part.partition("-")
        found.update(range(int(lo), int(hi or lo) + 1))
    return found


class _Enqueue(FileSystemEventHandler):
    """Puts every event's path on a queue (the handler does nothing else)."""

    def __init__(self, events: queue.Queue[str]) -> None:
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.events.put(str(event.src_path))


def _raise_unavailable() -> None:
    raise SlurmUnavailable("slurmctld not installed")


def test_missing_slurm_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="required when CI=true"):
        require_slurm(_raise_unavailable)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_slurm(_raise_unavailable)


@pytest.mark.slurm
def test_node_is_idle_with_typed_gpus(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run(["sinfo", "-h", "-n", slurm_cluster.node, "-o", "%T %G"]).stdout.split()
    assert out == ["idle", "gpu:a30:4"]
    assert (CGROUP_ROOT / "freezer" / f"slurm_{slurm_cluster.node}").is_dir()
    assert all(d.alive() for d in slurm_cluster.daemons.values())


@pytest.mark.slurm
def test_gpu_jobs_get_disjoint_indices_shown_by_scontrol(slurm_cluster: SlurmCluster) -> None:
    first = slurm_cluster.sbatch("a30:2")
    second = slurm_cluster.sbatch(2)  # an untyped request on a typed node gets typed GPUs too
    for job in (first, second):
        slurm_cluster.wait_job_running(job)
    details = [slurm_cluster.job_gres(job)[slurm_cluster.node] for job in (first, second)]
    for detail in details:
        assert re.fullmatch(r"gpu:a30:2\(IDX:[0-9,-]+\)", detail), detail
    assert indices(details[0]) | indices(details[1]) == {0, 1, 2, 3}
    assert f"GRES={details[0]}" in slurm_cluster.show_job(first)


@pytest.mark.slurm
def test_gpu_job_cgroup_directory_is_seen_by_inotify(slurm_cluster: SlurmCluster) -> None:
    # A running job keeps uid_0 in place, so the watch below already covers where job_N appears
    # (a watch added to a new parent can miss children made before it).
    holder = slurm_cluster.sbatch(None)
    slurm_cluster.wait_job_running(holder)
    slurm_cluster.wait_job_cgroup(holder)
    events: queue.Queue[str] = queue.Queue()
    observer = InotifyObserver()
    observer.schedule(_Enqueue(events), str(CGROUP_ROOT / "freezer" / f"slurm_{slurm_cluster.node}"),
                      recursive=True)
    observer.start()
    try:
        job = slurm_cluster.sbatch("a30:2")

        def job_event() -> str | None:
            try:
                path = events.get(timeout=0.5)
            except queue.Empty:
                return None
            return path if re.search(rf"/uid_0/job_{job}(/|$)", path) else None

        path = wait_for(job_event, 60, f"an inotify event for job {job}")
    finally:
        observer.stop()
        observer.join(10)
    job_dir = CGROUP_ROOT / "freezer" / f"slurm_{slurm_cluster.node}" / "uid_0" / f"job_{job}"
    assert path.startswith(str(job_dir))
    assert job_dir.is_dir()
    assert slurm_cluster.job_cgroup_dir(job) == job_dir
    # Slurm already knows the job's GPUs when its directory exists.
    assert len(indices(slurm_cluster.job_gres(job)[slurm_cluster.node])) == 2
    slurm_cluster.cancel(job)
    wait_for(lambda: not job_dir.exists(), 60, f"{job_dir} to go away")


@pytest.mark.slurm
def test_cpu_only_job_has_a_cgroup_and_no_gpus(slurm_cluster: SlurmCluster) -> None:
    job = slurm_cluster.sbatch(None)
    slurm_cluster.wait_job_running(job)
    assert slurm_cluster.wait_job_cgroup(job).name == f"job_{job}"
    assert slurm_cluster.job_gres(job) == {slurm_cluster.node: ""}
    assert "IDX" not in slurm_cluster.show_job(job)


@pytest.mark.slurm
def test_job_can_open_only_its_own_fake_gpus(slurm_cluster: SlurmCluster) -> None:
    # ENXIO: the device is the job's but has no driver behind it; EPERM: the devices cgroup denies it.
    script = (
        "import errno, os, sys\n"
        "print('gpus', os.environ['SLURM_JOB_GPUS'])\n"
        "for i in range(4):\n"
        "    try:\n"
        "        os.close(os.open(f'{sys.argv[1]}/nvidia{i}', os.O_RDONLY))\n"
        "        print(i, 'open')\n"
        "    except OSError as e:\n"
        "        print(i, errno.errorcode[e.errno])\n"
    )
    (slurm_cluster.workdir / "probe.py").write_text(script)
    job = slurm_cluster.sbatch("a30:1", command=f"python3 probe.py {slurm_cluster.workdir / 'dev'}")
    assert slurm_cluster.wait_job_done(job) == "COMPLETED"
    lines = dict(line.split() for line in (slurm_cluster.workdir / "out" / f"{job}.out").read_text().splitlines())
    own = {int(i) for i in lines.pop("gpus").split(",")}
    assert len(own) == 1
    assert {int(i) for i, what in lines.items() if what != "EPERM"} == own
    assert {what for i, what in lines.items() if int(i) in own} <= {"ENXIO", "ENODEV", "open"}


@pytest.mark.slurm
def test_warm_up_runs_a_job_to_its_end_and_leaves_nothing(slurm_cluster: SlurmCluster) -> None:
    before = slurm_cluster.run(["squeue", "-h", "-t", "all", "-o", "%i"]).stdout.split()
    slurm_cluster.warm_up()
    assert slurm_cluster.queue() == []
    assert slurm_cluster.job_cgroup_dirs() == []
    ran = [j for j in slurm_cluster.run(["squeue", "-h", "-t", "all", "-o", "%i"]).stdout.split() if j not in before]
    assert [slurm_cluster.job_state(j) for j in ran] == ["COMPLETED"]


@pytest.mark.slurm
def test_untyped_gres_shows_plain_gpu_indices(slurm_cluster_untyped: SlurmCluster) -> None:
    node = slurm_cluster_untyped.node
    out = slurm_cluster_untyped.run(["sinfo", "-h", "-n", node, "-o", "%G"]).stdout.strip()
    assert out == "gpu:4"
    job = slurm_cluster_untyped.sbatch(2)
    slurm_cluster_untyped.wait_job_running(job)
    detail = slurm_cluster_untyped.job_gres(job)[node]
    assert re.fullmatch(r"gpu:2\(IDX:[0-9,-]+\)", detail), detail
    assert len(indices(detail)) == 2


@pytest.mark.slurm
def test_controller_can_stop_and_come_back_with_jobs_running(slurm_cluster: SlurmCluster) -> None:
    job = slurm_cluster.sbatch("a30:1")
    slurm_cluster.wait_job_running(job)
    slurm_cluster.stop_slurmctld()
    try:
        # (`scontrol show job` would also fail, but only after retrying for about 18 s.)
        ping = slurm_cluster.run(["scontrol", "ping"], check=False)
        assert ping.returncode != 0
        assert "DOWN" in ping.stdout
        assert slurm_cluster.job_cgroup_dir(job) is not None  # the job itself runs on
    finally:
        slurm_cluster.start_slurmctld()
    assert slurm_cluster.job_state(job) == "RUNNING"


@pytest.mark.slurm
def test_teardown_leaves_no_daemon_job_or_cgroup(
    slurm_cluster_factory: Callable[..., SlurmCluster],
) -> None:
    cluster = slurm_cluster_factory(gpus=2, cpus=2)
    jobs = [cluster.sbatch(1), cluster.sbatch(None)]
    for job in jobs:
        cluster.wait_job_running(job)
        cluster.wait_job_cgroup(job)
    job_pids = cgroup_pids(CGROUP_ROOT / "freezer" / f"slurm_{cluster.node}")
    daemon_pids = [d.pid for d in cluster.daemons.values()]
    assert job_pids
    assert cluster.stop() == []
    assert cluster.leftovers() == []
    assert not list(CGROUP_ROOT.glob(f"*/slurm_{cluster.node}"))
    for pid in [*job_pids, *daemon_pids]:
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid), f"pid {pid} still runs"
    assert not cluster.state_file.exists()


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.slurm
def test_workers_register_dynamically_in_their_namespaces(slurm_multinode: SlurmMultiNode) -> None:
    assert slurm_multinode.node_states() == {w: "idle" for w in slurm_multinode.workers}
    out = slurm_multinode.run(["sinfo", "-h", "-N", "-o", "%N %G %f"]).stdout.split("\n")
    assert sorted(line.split() for line in out if line) == [[w, "gpu:2", "dyn"] for w in slurm_multinode.workers]
    worker = slurm_multinode.workers[0]
    seen = slurm_multinode.run_in(worker, ["sh", "-c", "hostname; ip -o -4 addr show dev eth0"])
    assert seen.returncode == 0, seen.stderr
    name, addr = seen.stdout.splitlines()
    assert name == worker
    assert slurm_multinode.net.by_name[worker].address in addr


@pytest.mark.slurm
def test_two_node_job_holds_gpus_on_both_workers(slurm_multinode: SlurmMultiNode) -> None:
    job = slurm_multinode.sbatch(1, nodes=2)
    try:
        slurm_multinode.wait_job_running(job)
        gres = slurm_multinode.job_gres(job)
        assert sorted(gres) == sorted(slurm_multinode.workers)
        for worker in slurm_multinode.workers:
            assert re.fullmatch(r"gpu:1\(IDX:[01]\)", gres[worker]), gres
            assert slurm_multinode.wait_job_cgroup(job, worker).parent.parent.name == f"slurm_{worker}"
        # A command on a worker reaches the controller the way a daemon there would.
        seen = slurm_multinode.run_in(slurm_multinode.workers[1], ["scontrol", "show", "job", "-d", "-o", job])
        assert seen.returncode == 0, seen.stderr
        assert "GRES=gpu:1(IDX:" in seen.stdout
    finally:
        slurm_multinode.cancel(job)
    slurm_multinode.wait_queue_empty()


@pytest.mark.slurm
def test_multinode_teardown_removes_namespaces_processes_and_cgroups(tmp_path: Path) -> None:
    require_slurm()
    cluster = SlurmMultiNode(tmp_path, workers=2, gpus_per_worker=1).start()
    try:
        job = cluster.sbatch(1, nodes=2)
        cluster.wait_job_running(job)
        sleeper = cluster.spawn_in(cluster.workers[0], ["sleep", "600"])
        namespaces = [h.netns for h in cluster.net.by_name.values()]
        assert all(Path(f"/run/netns/{ns}").exists() for ns in namespaces)
    finally:
        problems = cluster.stop()
    assert problems == []
    assert cluster.leftovers() == []
    assert sleeper.poll() is not None
    assert not any(Path(f"/run/netns/{ns}").exists() for ns in namespaces)
    for worker in cluster.workers:
        assert not list(CGROUP_ROOT.glob(f"*/slurm_{worker}"))
    ip = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    assert cluster.prefix not in ip and "vw1" not in ip
