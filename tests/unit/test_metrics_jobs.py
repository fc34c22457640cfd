"""hpc_job labels, job info, the job-mapping directory, MIG labels, memory per job, and GPUs without NVML."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from exporter_watchdog.core.model import Job, JobSource, Owner, Phase, Snapshot
from exporter_watchdog.metrics.gpu import GpuCollector
from exporter_watchdog.metrics.jobs import GpuJob, JobInfoCollector, JobMap, merge, read_mapping_dir, snapshot_jobs
from exporter_watchdog.metrics.nvml import GpuProcess, MemoryInfo, MigDevice
from tests.unit.test_metrics_gpu import MIB, FakeBackend, labels_of, make_backend, no_cgroup


def snapshot(*jobs: Job) -> Snapshot:
    return Snapshot(node="n1", phase=Phase.SERVING, node_gpus=4, claimed_gpus=(2, 3),
                    gpu_owner={0: Owner.SLURM, 1: Owner.FREE, 2: Owner.WATCHDOG, 3: Owner.WATCHDOG},
                    jobs=tuple(jobs), profile="demo", model="m")


def job(job_id: str, gpus: set[int] | None, user: str | None = "alice", partition: str | None = "gpu",
        source: JobSource = JobSource.CGROUP) -> Job:
    return Job(job_id, None if gpus is None else frozenset(gpus), 1.0, source, user, partition)


def collector(backend: FakeBackend | None, **kw: object) -> tuple[CollectorRegistry, GpuCollector]:
    registry = CollectorRegistry()
    kw.setdefault("read_cgroup", no_cgroup)
    c = GpuCollector(backend, "node7", cache_seconds=0.0, **kw)  # type: ignore[arg-type]
    registry.register(c)
    return registry, c


def series(registry: CollectorRegistry, name: str) -> list[dict[str, str]]:
    return [dict(s.labels) for m in registry.collect() for s in m.samples if s.name == name]


def test_snapshot_jobs_by_gpu_leave_out_unknown_and_cpu_only_jobs() -> None:
    snap = snapshot(job("7", {0}), job("8", set()), job("9", None), job("10", {0, 1}, user=None, partition=None),
                    job("7", {0}, source=JobSource.PROLOG, user=None))
    assert snapshot_jobs(snap) == {
        "0": (GpuJob("7", "alice", "gpu"), GpuJob("10")),  # the prolog's copy of job 7 does not hide its user
        "1": (GpuJob("10"),),
    }


def test_hpc_job_on_every_dcgm_series_of_a_held_gpu_and_one_series_per_job() -> None:
    backend = make_backend(3)
    jobs = {"0": (GpuJob("41"),), "1": (GpuJob("42"), GpuJob("43"))}  # GPU 1 shared (shard/MPS)
    registry, _ = collector(backend, jobs=lambda: jobs)
    for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"):
        got = sorted((s["gpu"], s.get("hpc_job", "-")) for s in series(registry, name))
        assert got == [("0", "41"), ("1", "42"), ("1", "43"), ("2", "-")], name
    assert registry.get_sample_value("DCGM_FI_DEV_GPU_UTIL", {**labels_of(1, backend), "hpc_job": "43"}) == 20.0
    assert registry.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels_of(2, backend)) == 30.0
    # Families of our own keep their bounded `gpu` labels.
    assert {s["gpu"] for s in series(registry, "exporter_watchdog_gpu_up")} == {"0", "1", "2"}


def test_job_info_lists_only_jobs_running_now() -> None:
    current = [snapshot(job("7", {0}), job("8", {1, 2}, user="bob", partition="long"), job("9", None))]
    registry = CollectorRegistry()
    registry.register(JobInfoCollector(JobMap(lambda: current[0])))
    rows = sorted(tuple(s.labels.values()) for m in registry.collect() for s in m.samples)
    assert rows == [("0", "7", "alice", "gpu"), ("1", "8", "bob", "long"), ("2", "8", "bob", "long")]
    current[0] = snapshot(job("8", {1, 2}, user="bob", partition="long"))
    assert registry.get_sample_value("exporter_watchdog_gpu_job_info",
                                     {"gpu": "0", "hpc_job": "7", "user": "alice", "partition": "gpu"}) is None
    current[0] = snapshot()
    assert [s for m in registry.collect() for s in m.samples] == []


def test_mapping_dir_in_dcgm_exporters_format(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("1001\n1002\n\n1001\n")  # duplicates and blank lines are dropped
    (tmp_path / "2.1").write_text("2001\n")  # a MIG instance: <GPU>.<GPU instance id>
    (tmp_path / "3").write_text("")  # an empty file: no job
    (tmp_path / "notes.txt").write_text("9999\n")  # not a GPU key: ignored, as dcgm-exporter does
    (tmp_path / "1").mkdir()  # a directory named like a GPU: ignored
    (tmp_path / "4").write_text("x" * 500 + "\n3001\n")  # an over-long line is no job id
    assert read_mapping_dir(tmp_path) == {
        "0": (GpuJob("1001"), GpuJob("1002")),
        "2.1": (GpuJob("2001"),),
        "4": (GpuJob("3001"),),
    }
    assert read_mapping_dir(tmp_path / "missing") == {}


def test_mapping_dir_and_the_daemons_jobs_merge_and_label_the_series(tmp_path: Path) -> None:
    (tmp_path / "0").write_text("7\n")  # the site's prolog names job 7 too: one series, with its user
    (tmp_path / "1").write_text("55\n")
    jobs = JobMap(lambda: snapshot(job("7", {0})), tmp_path)
    assert jobs() == {"0": (GpuJob("7", "alice", "gpu"),), "1": (GpuJob("55"),)}
    assert merge({"0": (GpuJob("7"),)}, {"0": (GpuJob("7", "u", "p"),)}) == {"0": (GpuJob("7", "u", "p"),)}

    # Exporter-only: the mapping files alone, and the owner follows them.
    backend = make_backend(2)
    registry, _ = collector(backend, jobs=JobMap(None, tmp_path))
    assert [(s["gpu"], s.get("hpc_job")) for s in series(registry, "DCGM_FI_DEV_GPU_UTIL")] == [
        ("0", "7"), ("1", "55")]
    assert registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": "1", "owner": "slurm"}) == 1
    (tmp_path / "1").unlink()  # the epilog removed it
    assert registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": "1", "owner": "free"}) == 1
    assert [s.get("hpc_job") for s in series(registry, "DCGM_FI_DEV_GPU_UTIL")] == ["7", None]


def test_mig_instances_carry_gpu_i_profile_and_gpu_i_id() -> None:
    backend = make_backend(2)
    backend.gpus[1].migs = [
        MigDevice(1, "1g.6gb", MemoryInfo(total=6016 * MIB, used=1000 * MIB, free=5016 * MIB, reserved=None)),
        MigDevice(2, "2g.12gb", MemoryInfo(total=12032 * MIB, used=10 * MIB, free=12022 * MIB, reserved=None)),
    ]
    registry, _ = collector(backend, jobs=lambda: {"1.2": (GpuJob("77"),)})
    fb = {(s["gpu"], s.get("GPU_I_ID"), s.get("GPU_I_PROFILE"), s.get("hpc_job")): s
          for s in series(registry, "DCGM_FI_DEV_FB_USED")}
    assert set(fb) == {("0", None, None, None), ("1", None, None, None), ("1", "1", "1g.6gb", None),
                       ("1", "2", "2g.12gb", "77")}
    mig = {**labels_of(1, backend), "GPU_I_PROFILE": "1g.6gb", "GPU_I_ID": "1"}
    assert registry.get_sample_value("DCGM_FI_DEV_FB_USED", mig) == 1000
    assert registry.get_sample_value("DCGM_FI_DEV_FB_FREE", mig) == 5016
    # MIG off on GPU 0 (NOT_SUPPORTED) is asked once, not on every pass.
    asked = backend.calls["mig_devices"]
    list(registry.collect())
    assert backend.calls["mig_devices"] == asked + 1  # GPU 1 only


def test_memory_per_owner_and_job_is_summed_not_per_pid() -> None:
    backend = make_backend(2)
    backend.gpus[0].procs = [GpuProcess(100, 20 << 30), GpuProcess(101, 1 << 30),  # the server and its child
                             GpuProcess(200, 2 << 30), GpuProcess(201, 3 << 30),  # two processes of job 42
                             GpuProcess(300, 5 << 20), GpuProcess(301, None)]  # foreign; one without a size
    table = {200: ["0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0"],
             201: ["0::/system.slice/slurmstepd.scope/job_42/step_1/user/task_0"]}
    registry, _ = collector(backend, server_pids=lambda: {100, 101}, read_cgroup=table.get)
    rows = {(s["gpu"], s["owner"], s["hpc_job"]) for s in series(registry, "exporter_watchdog_gpu_memory_used_bytes")}
    assert rows == {("0", "watchdog", ""), ("0", "slurm", "42"), ("0", "foreign", "")}

    def used(owner: str, hpc_job: str = "") -> float | None:
        return registry.get_sample_value("exporter_watchdog_gpu_memory_used_bytes",
                                         {"gpu": "0", "owner": owner, "hpc_job": hpc_job})

    assert used("watchdog") == 21 << 30
    assert used("slurm", "42") == 5 << 30
    assert used("foreign") == 5 << 20


def test_without_nvml_owners_and_down_gpus_come_from_the_daemon() -> None:
    owners = {0: "slurm", 1: "free", 2: "watchdog", 3: "watchdog"}
    registry, c = collector(None, owners=lambda: owners, node_gpus=4, jobs=lambda: {"0": (GpuJob("7"),)})
    for gpu, owner in owners.items():
        for candidate in ("free", "watchdog", "slurm"):
            value = registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": str(gpu), "owner": candidate})
            assert value == (1.0 if candidate == owner else 0.0), (gpu, candidate)
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": str(gpu)}) == 0
        assert registry.get_sample_value("exporter_watchdog_gpu_lost", {"gpu": str(gpu)}) == 0
    names = {m.name for m in registry.collect()}
    assert not any(n.startswith("DCGM_") for n in names)
    assert registry.get_sample_value("exporter_watchdog_gpu_collect_errors_total") == 0


def test_nvml_failing_after_start_keeps_owners_and_marks_every_gpu_down() -> None:
    backend = make_backend(2)
    registry, _ = collector(backend, owners=lambda: {0: "watchdog", 1: "free", 2: "slurm"}, node_gpus=3)
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "0"}) == 1
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "2"}) == 0  # node.gpus says 3, NVML 2
    from exporter_watchdog.metrics.nvml import GpuBackendError

    backend.count_error = GpuBackendError("Driver/library version mismatch")
    assert [registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": str(g)}) for g in range(3)] == [0, 0, 0]
    assert registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": "2", "owner": "slurm"}) == 1
    assert registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": "0", "owner": "watchdog"}) == 1
