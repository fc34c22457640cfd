"""Every Slurm job cgroup layout, built on temp dirs: scan_jobs, job_parent_dirs, watch plans, path mapping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from exporter_watchdog.detect.cgroups import (
    LAYOUT_V1,
    LAYOUT_V1_NODE,
    LAYOUT_V2,
    LAYOUT_V2_NODE,
    JobDir,
    is_job_dir,
    job_id_from_name,
    job_id_from_path,
    job_parent_dirs,
    scan_jobs,
    watch_plan,
    watch_roots,
)

NODE = "gpu-n1"
SLUID = "s5K1KKYAYG5D00"


def make_job(parent: Path, name: str, steps: tuple[str, ...] = ("step_extern", "step_batch")) -> Path:
    """A job directory the way slurmstepd leaves it: steps with tasks, and cgroup files."""
    job = parent / name
    for step in steps:
        (job / step / "task_0").mkdir(parents=True, exist_ok=True)
        (job / step / "cgroup.procs").write_text("")
    (job / "cgroup.procs").write_text("")
    return job


@dataclass(frozen=True)
class Layout:
    name: str
    parent: str  # the job parent directory, relative to the cgroup root
    layout: str
    job_names: tuple[str, ...] = ("job_101", "job_7")


LAYOUTS = [
    Layout("v1 slurm", "freezer/slurm/uid_1000", LAYOUT_V1),
    Layout("v1 slurm_<node>", f"freezer/slurm_{NODE}/uid_0", LAYOUT_V1_NODE),
    Layout("v1 slurm_<node> in cpuset only", f"cpuset/slurm_{NODE}/uid_0", LAYOUT_V1_NODE),
    Layout("v1 in memory", "memory/slurm/uid_42", LAYOUT_V1),
    Layout("v2 system.slice", "system.slice/slurmstepd.scope", LAYOUT_V2),
    Layout("v2 <node>_slurmstepd", f"system.slice/{NODE}_slurmstepd.scope", LAYOUT_V2_NODE),
    Layout("v2 hybrid unified", "unified/system.slice/slurmstepd.scope", LAYOUT_V2),
    Layout("v2 CgroupSlice", "slurm.slice/slurmstepd.scope", LAYOUT_V2),
    Layout("v2 nested slice", "hpc.slice/hpc-jobs.slice/slurmstepd.scope", LAYOUT_V2),
    Layout("v2 SLUID", "system.slice/slurmstepd.scope", LAYOUT_V2, (SLUID, "sABCDEFGH234")),
    Layout("v2 SLUID per node", f"system.slice/{NODE}_slurmstepd.scope", LAYOUT_V2_NODE, (SLUID,)),
]


def expected_ids(layout: Layout) -> set[str]:
    return {name.removeprefix("job_") for name in layout.job_names}


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_scan_finds_every_job_of_a_layout(tmp_path: Path, layout: Layout) -> None:
    parent = tmp_path / layout.parent
    parent.mkdir(parents=True)
    (parent / "cgroup.procs").write_text("")
    if layout.layout.startswith("v2"):
        (parent / "system").mkdir()  # slurmstepd's own cgroup inside the scope
    for name in layout.job_names:
        make_job(parent, name)
    jobs = scan_jobs(tmp_path, NODE)
    assert jobs == {
        job_id: JobDir(job_id, parent / name, layout.layout)
        for name in layout.job_names
        for job_id in [name.removeprefix("job_")]
    }
    assert job_parent_dirs(tmp_path, NODE) == [parent]
    assert set(jobs) == expected_ids(layout)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_paths_map_to_their_job(tmp_path: Path, layout: Layout) -> None:
    parent = tmp_path / layout.parent
    for name in layout.job_names:
        job_id = name.removeprefix("job_")
        job = parent / name
        for path in (job, job / "step_0", job / "step_batch" / "user" / "task_0", job / "cgroup.procs"):
            assert job_id_from_path(path, tmp_path, NODE) == job_id
        assert is_job_dir(job, tmp_path, NODE)
        assert not is_job_dir(job / "step_0", tmp_path, NODE)
    assert job_id_from_path(parent, tmp_path, NODE) is None
    assert job_id_from_path(parent / "system", tmp_path, NODE) is None
    assert job_id_from_path(parent / "job_x", tmp_path, NODE) is None


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.name)
def test_watch_plan_of_a_layout(tmp_path: Path, layout: Layout) -> None:
    parent = tmp_path / layout.parent
    parent.mkdir(parents=True)
    plan = watch_plan(tmp_path, NODE)
    # the recursive watch is the Slurm root (v1, above uid_U) or the scope (v2)
    slurm_root = parent.parent if layout.layout.startswith("v1") else parent
    assert plan.recursive == (slurm_root,)
    # its parent is watched shallowly, so a Slurm root that appears later is seen too
    assert slurm_root.parent in plan.shallow and tmp_path in plan.shallow
    assert not set(plan.recursive) & set(plan.shallow)
    assert watch_roots(tmp_path, NODE) == [*plan.recursive, *plan.shallow]


def test_v1_controllers_report_one_job_once(tmp_path: Path) -> None:
    for controller in ("cpuset", "devices", "freezer", "memory"):
        make_job(tmp_path / controller / f"slurm_{NODE}" / "uid_0", "job_5")
    make_job(tmp_path / "cpuset" / f"slurm_{NODE}" / "uid_0", "job_6")
    jobs = scan_jobs(tmp_path, NODE)
    assert set(jobs) == {"5", "6"}
    # freezer exists from slurmd start, so it is the path reported when it has the job
    assert jobs["5"].path == tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0" / "job_5"
    assert jobs["6"].path == tmp_path / "cpuset" / f"slurm_{NODE}" / "uid_0" / "job_6"
    assert len(job_parent_dirs(tmp_path, NODE)) == 4


def test_every_layout_at_once(tmp_path: Path) -> None:
    make_job(tmp_path / "freezer" / "slurm" / "uid_0", "job_1")
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "uid_1000", "job_2")
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "uid_1001", "job_3")
    make_job(tmp_path / "unified" / "system.slice" / "slurmstepd.scope", "job_4")
    make_job(tmp_path / "system.slice" / f"{NODE}_slurmstepd.scope", SLUID)
    jobs = scan_jobs(tmp_path, NODE)
    assert {k: v.layout for k, v in jobs.items()} == {
        "1": LAYOUT_V1, "2": LAYOUT_V1_NODE, "3": LAYOUT_V1_NODE, "4": LAYOUT_V2, SLUID: LAYOUT_V2_NODE,
    }


def test_other_nodes_and_strays_are_ignored(tmp_path: Path) -> None:
    make_job(tmp_path / "freezer" / "slurm_other-node" / "uid_0", "job_1")
    make_job(tmp_path / "system.slice" / "other-node_slurmstepd.scope", "job_2")
    make_job(tmp_path / "system.slice" / "other.scope", "job_3")
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0", "job_abc")
    make_job(tmp_path / "freezer" / f"slurm_{NODE}" / "not_a_uid", "job_4")
    (tmp_path / "freezer" / f"slurm_{NODE}" / "uid_0" / "job_5").write_text("a file, not a cgroup")
    scope = tmp_path / "system.slice" / "slurmstepd.scope"
    (scope / "system").mkdir(parents=True)
    (scope / "sOME").mkdir()  # too short for a SLUID
    (scope / "job_9").symlink_to(tmp_path)  # never follow links out of the tree
    (tmp_path / "freezer" / "slurm_x" / "uid_0" / "job_8").mkdir(parents=True)
    assert scan_jobs(tmp_path, NODE) == {}
    assert job_id_from_path(tmp_path / "freezer" / "slurm_other-node" / "uid_0" / "job_1", tmp_path, NODE) is None


def test_a_cgroup2_root_has_no_v1_controllers(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    make_job(tmp_path / "init.scope" / "slurm" / "uid_0", "job_1")  # not a v1 controller on cgroup2
    make_job(tmp_path / "system.slice" / "slurmstepd.scope", "job_2")
    assert set(scan_jobs(tmp_path, NODE)) == {"2"}
    assert tmp_path / "init.scope" not in watch_plan(tmp_path, NODE).shallow


def test_missing_and_empty_roots(tmp_path: Path) -> None:
    assert scan_jobs(tmp_path / "absent", NODE) == {}
    assert job_parent_dirs(tmp_path / "absent", NODE) == []
    plan = watch_plan(tmp_path / "absent", NODE)
    assert plan.recursive == () and plan.shallow == ()
    assert scan_jobs(tmp_path, NODE) == {}
    assert watch_plan(tmp_path, NODE).shallow == (tmp_path,)


def test_watch_plan_before_the_first_job(tmp_path: Path) -> None:
    # Debian's slurmd: freezer/slurm_<node> exists at start, cpuset/devices get theirs at the first job
    for controller in ("cpuset", "devices", "freezer", "memory"):
        (tmp_path / controller).mkdir()
    (tmp_path / "freezer" / f"slurm_{NODE}").mkdir()
    (tmp_path / "unified").mkdir()
    plan = watch_plan(tmp_path, NODE)
    assert plan.recursive == (tmp_path / "freezer" / f"slurm_{NODE}",)
    assert set(plan.shallow) == {tmp_path, tmp_path / "unified"} | {
        tmp_path / c for c in ("cpuset", "devices", "freezer", "memory")
    }


def test_paths_outside_the_root_and_odd_shapes_map_to_nothing(tmp_path: Path) -> None:
    outside = Path("/elsewhere/freezer/slurm/uid_0/job_1")
    assert job_id_from_path(outside, tmp_path, NODE) is None
    assert not is_job_dir(outside, tmp_path, NODE)
    for rel in (
        "freezer/slurm/job_1",  # no uid level
        "slurm/uid_0/job_1",  # no controller level
        "unified/slurm/uid_0/job_1",  # unified is cgroup2, not a controller
        "system.slice/job_1",  # no scope
        "slurmstepd.scope/job_1",  # no slice
        "a.slice/b.slice/c.slice/slurmstepd.scope/job_1",  # deeper than systemd nests here
    ):
        assert job_id_from_path(tmp_path / rel, tmp_path, NODE) is None, rel


@pytest.mark.parametrize(
    ("name", "job_id"),
    [("job_1", "1"), ("job_4294967294", "4294967294"), (SLUID, SLUID), ("system", None), ("job_", None),
     ("job_1a", None), ("step_0", None), ("s123", None), ("S5K1KKYAYG5D00", None), ("uid_0", None)],
)
def test_job_id_from_name(name: str, job_id: str | None) -> None:
    assert job_id_from_name(name) == job_id
