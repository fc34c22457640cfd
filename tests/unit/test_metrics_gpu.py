"""GpuCollector over a fake of the NVML-facing interface: families, units, labels, sick GPUs, XIDs, cache."""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from prometheus_client import CollectorRegistry

from exporter_watchdog.metrics.gpm import GPM_FAMILIES
from exporter_watchdog.metrics.gpu import DCGM_FAMILIES, DRIVER_LABEL, LABELS, GpuCollector, XidWatcher
from exporter_watchdog.metrics.nvml import (
    GpmValues,
    GpuBackendError,
    GpuErrorKind,
    GpuProcess,
    MemoryInfo,
    MigDevice,
    RemappedRows,
    Utilization,
    XidEvent,
)

MIB = 1024 * 1024


@dataclass
class FakeGpu:
    uuid: str
    minor: int
    util: float = 37.0
    mem_util: float = 12.0
    used: int = 1000 * MIB + 123  # not a whole MiB: the exporter floors like nvidia-smi
    free: int = 22000 * MIB
    reserved: int | None = 500 * MIB
    temp: float = 45.0
    mem_temp: float = 52.0
    power_mw: float = 123456.0
    energy_mj: float = 9.5e9
    sm_mhz: float = 1410.0
    mem_mhz: float = 1215.0
    replays: float = 3.0
    enc: float = 1.0
    dec: float = 2.0
    procs: list[GpuProcess] = field(default_factory=list)
    remapped: RemappedRows = field(default_factory=lambda: RemappedRows(2, 1, False, False))
    migs: list[MigDevice] | None = None  # None: MIG off
    gpm: bool = False
    nvlink: int = 0
    gpm_values: GpmValues = field(default_factory=GpmValues)


NOT_SUPPORTED = GpuBackendError("Not Supported", GpuErrorKind.NOT_SUPPORTED)
DRIVER = "550.54.15"


class FakeBackend:
    """The GpuBackend interface over plain values; `errors[(gpu, call)]` makes one call fail."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        self.gpus = gpus
        self.errors: dict[tuple[int, str], BaseException] = {}
        self.count_error: BaseException | None = None
        self.calls: Counter[str] = Counter()
        self.xids: queue.Queue[XidEvent | BaseException] = queue.Queue()
        self.gate: threading.Event | None = None  # when set up, device_count() waits on it
        self.entered = threading.Event()

    def _get(self, gpu: int, call: str) -> FakeGpu:
        self.calls[call] += 1
        err = self.errors.get((gpu, call)) or self.errors.get((gpu, "*"))
        if err is not None:
            raise err
        return self.gpus[gpu]

    def device_count(self) -> int:
        self.calls["device_count"] += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test never opened the gate"
        if self.count_error is not None:
            raise self.count_error
        return len(self.gpus)

    def uuid(self, gpu: int) -> str:
        return self._get(gpu, "uuid").uuid

    def name(self, gpu: int) -> str:
        self._get(gpu, "name")
        return "NVIDIA A30"

    def pci_bus_id(self, gpu: int) -> str:
        self._get(gpu, "pci_bus_id")
        return f"00000000:{0x17 + gpu:02X}:00.0"

    def minor_number(self, gpu: int) -> int:
        return self._get(gpu, "minor_number").minor

    def utilization(self, gpu: int) -> Utilization:
        g = self._get(gpu, "utilization")
        return Utilization(gpu=g.util, memory=g.mem_util)

    def encoder_utilization(self, gpu: int) -> float:
        return self._get(gpu, "encoder_utilization").enc

    def decoder_utilization(self, gpu: int) -> float:
        return self._get(gpu, "decoder_utilization").dec

    def memory(self, gpu: int) -> MemoryInfo:
        g = self._get(gpu, "memory")
        return MemoryInfo(total=24576 * MIB, used=g.used, free=g.free, reserved=g.reserved)

    def gpu_temperature(self, gpu: int) -> float:
        return self._get(gpu, "gpu_temperature").temp

    def memory_temperature(self, gpu: int) -> float:
        return self._get(gpu, "memory_temperature").mem_temp

    def power_mw(self, gpu: int) -> float:
        return self._get(gpu, "power_mw").power_mw

    def total_energy_mj(self, gpu: int) -> float:
        return self._get(gpu, "total_energy_mj").energy_mj

    def sm_clock_mhz(self, gpu: int) -> float:
        return self._get(gpu, "sm_clock_mhz").sm_mhz

    def mem_clock_mhz(self, gpu: int) -> float:
        return self._get(gpu, "mem_clock_mhz").mem_mhz

    def pcie_replay_count(self, gpu: int) -> float:
        return self._get(gpu, "pcie_replay_count").replays

    def compute_processes(self, gpu: int) -> list[GpuProcess]:
        return list(self._get(gpu, "compute_processes").procs)

    def driver_version(self) -> str:
        self.calls["driver_version"] += 1
        return DRIVER

    def remapped_rows(self, gpu: int) -> RemappedRows:
        return self._get(gpu, "remapped_rows").remapped

    def nvlink_links(self, gpu: int) -> int:
        return self._get(gpu, "nvlink_links").nvlink

    def mig_devices(self, gpu: int) -> list[MigDevice]:
        migs = self._get(gpu, "mig_devices").migs
        if migs is None:
            raise NOT_SUPPORTED
        return list(migs)

    def gpm_supported(self, gpu: int) -> bool:
        return self._get(gpu, "gpm_supported").gpm

    def gpm_sample(self, gpu: int) -> object:
        self._get(gpu, "gpm_sample")
        return (gpu, self.calls["gpm_sample"])

    def gpm_metrics(self, older: object, newer: object) -> GpmValues:
        gpu = newer[0]  # type: ignore[index]
        return self._get(gpu, "gpm_metrics").gpm_values

    def gpm_free(self, sample: object) -> None:
        self.calls["gpm_free"] += 1

    def wait_xid(self, timeout_seconds: float) -> XidEvent | None:
        try:
            item = self.xids.get(timeout=timeout_seconds)
        except queue.Empty:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        return None


def make_backend(n: int = 3) -> FakeBackend:
    return FakeBackend([FakeGpu(uuid=f"GPU-{i:04d}", minor=10 + i, util=10.0 * (i + 1)) for i in range(n)])


def no_cgroup(pid: int) -> list[str] | None:
    return None


def register(backend: FakeBackend, **kw: object) -> tuple[CollectorRegistry, GpuCollector]:
    registry = CollectorRegistry()
    kw.setdefault("cache_seconds", 0.0)
    kw.setdefault("read_cgroup", no_cgroup)
    collector = GpuCollector(backend, "node7", **kw)  # type: ignore[arg-type]
    registry.register(collector)
    return registry, collector


def labels_of(gpu: int, backend: FakeBackend) -> dict[str, str]:
    g = backend.gpus[gpu]
    return {"gpu": str(gpu), "UUID": g.uuid, "pci_bus_id": f"00000000:{0x17 + gpu:02X}:00.0",
            "device": f"nvidia{g.minor}", "modelName": "NVIDIA A30", "Hostname": "node7", DRIVER_LABEL: DRIVER}


def families(registry: CollectorRegistry) -> dict[str, object]:
    return {m.name: m for m in registry.collect()}


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        time.sleep(0.01)


def test_every_dcgm_family_with_units_types_and_labels() -> None:
    backend = make_backend(2)
    xids = XidWatcher(backend)  # not started: no events yet, the gauge reads 0
    registry, _ = register(backend, xids=xids)
    fams = {m.name: m for m in registry.collect()}
    for name, (_doc, kind) in DCGM_FAMILIES.items():
        if name in GPM_FAMILIES:
            assert name not in fams, name  # no GPM sampler, no profiling families
            continue
        assert fams[name].type == kind, name
        assert [s.name for s in fams[name].samples] == [name, name], name
        for sample in fams[name].samples:
            assert tuple(sample.labels) == (*LABELS, DRIVER_LABEL)  # dcgm-exporter's order; no hpc_job
    for gpu in (0, 1):
        g, lab = backend.gpus[gpu], labels_of(gpu, backend)

        def value(name: str, lab: dict[str, str] = lab) -> float | None:
            return registry.get_sample_value(name, lab)

        assert value("DCGM_FI_DEV_GPU_UTIL") == g.util
        assert value("DCGM_FI_DEV_MEM_COPY_UTIL") == g.mem_util
        assert value("DCGM_FI_DEV_ENC_UTIL") == g.enc
        assert value("DCGM_FI_DEV_DEC_UTIL") == g.dec
        assert value("DCGM_FI_DEV_FB_USED") == g.used // MIB
        assert value("DCGM_FI_DEV_FB_FREE") == g.free // MIB
        assert g.reserved is not None and value("DCGM_FI_DEV_FB_RESERVED") == g.reserved // MIB
        assert value("DCGM_FI_DEV_GPU_TEMP") == g.temp
        assert value("DCGM_FI_DEV_MEMORY_TEMP") == g.mem_temp
        assert value("DCGM_FI_DEV_POWER_USAGE") == pytest.approx(g.power_mw / 1000)
        assert value("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == g.energy_mj
        assert value("DCGM_FI_DEV_SM_CLOCK") == g.sm_mhz
        assert value("DCGM_FI_DEV_MEM_CLOCK") == g.mem_mhz
        assert value("DCGM_FI_DEV_PCIE_REPLAY_COUNTER") == g.replays
        assert value("DCGM_FI_DEV_XID_ERRORS") == 0
        assert value("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS") == 2
        assert value("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS") == 1
        assert value("DCGM_FI_DEV_ROW_REMAP_FAILURE") == 0
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": str(gpu)}) == 1
        assert registry.get_sample_value("exporter_watchdog_gpu_lost", {"gpu": str(gpu)}) == 0
    assert fams["exporter_watchdog_gpu_up"].type == "gauge"
    assert fams["exporter_watchdog_gpu_lost"].type == "gauge"
    assert fams["exporter_watchdog_gpu_xid_errors"].type == "counter"
    assert fams["exporter_watchdog_gpu_collect_errors"].type == "counter"
    assert registry.get_sample_value("exporter_watchdog_gpu_collect_errors_total") == 0
    assert backend.calls["driver_version"] == 1  # asked once, not per GPU or pass
    duration = registry.get_sample_value("exporter_watchdog_gpu_collect_duration_seconds")
    assert duration is not None and duration >= 0


def test_without_xid_watcher_the_xid_families_are_left_out() -> None:
    registry, _ = register(make_backend(1))
    fams = families(registry)
    assert "DCGM_FI_DEV_XID_ERRORS" not in fams
    assert "exporter_watchdog_gpu_xid_errors" not in fams
    assert "DCGM_FI_DEV_GPU_UTIL" in fams


def test_unsupported_field_is_left_out_for_that_gpu_only_and_not_asked_again() -> None:
    backend = make_backend(2)
    backend.errors[(1, "memory_temperature")] = GpuBackendError("Not Supported", GpuErrorKind.NOT_SUPPORTED)
    backend.errors[(1, "minor_number")] = GpuBackendError("Not Supported", GpuErrorKind.NOT_SUPPORTED)
    registry, _ = register(backend)
    assert registry.get_sample_value("DCGM_FI_DEV_MEMORY_TEMP", labels_of(0, backend)) == 52.0
    lab1 = {**labels_of(1, backend), "device": "nvidia1"}  # no minor number: the index names the device
    assert registry.get_sample_value("DCGM_FI_DEV_MEMORY_TEMP", lab1) is None
    assert registry.get_sample_value("DCGM_FI_DEV_GPU_TEMP", lab1) == 45.0
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 1
    asked = backend.calls["memory_temperature"]
    for _ in range(3):
        list(registry.collect())
    assert backend.calls["memory_temperature"] == asked + 3  # GPU 0 only: GPU 1 is not asked again
    assert registry.get_sample_value("exporter_watchdog_gpu_collect_errors_total") == 0


def test_v1_memory_info_leaves_reserved_out() -> None:
    backend = make_backend(1)
    backend.gpus[0].reserved = None
    registry, _ = register(backend)
    assert registry.get_sample_value("DCGM_FI_DEV_FB_RESERVED", labels_of(0, backend)) is None
    assert registry.get_sample_value("DCGM_FI_DEV_FB_USED", labels_of(0, backend)) == 1000


def test_one_failing_gpu_leaves_the_others_intact_and_recovers() -> None:
    backend = make_backend(3)
    backend.errors[(1, "power_mw")] = GpuBackendError("Unknown Error")
    registry, _ = register(backend)
    for gpu in (0, 2):
        assert registry.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels_of(gpu, backend)) == 10.0 * (gpu + 1)
        assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": str(gpu)}) == 1
    fams = families(registry)
    for name in DCGM_FAMILIES:
        if name in fams:
            assert all(s.labels["gpu"] != "1" for s in fams[name].samples), name  # type: ignore[attr-defined]
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 0
    assert registry.get_sample_value("exporter_watchdog_gpu_lost", {"gpu": "1"}) == 0
    errors = registry.get_sample_value("exporter_watchdog_gpu_collect_errors_total")
    assert errors is not None and errors >= 1

    del backend.errors[(1, "power_mw")]
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 1
    assert registry.get_sample_value("DCGM_FI_DEV_POWER_USAGE", labels_of(1, backend)) == pytest.approx(123.456)


def test_lost_gpu_says_so() -> None:
    backend = make_backend(2)
    backend.errors[(0, "*")] = GpuBackendError("GPU is lost", GpuErrorKind.LOST)
    registry, _ = register(backend)
    assert registry.get_sample_value("exporter_watchdog_gpu_lost", {"gpu": "0"}) == 1
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "0"}) == 0
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 1
    assert registry.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels_of(1, backend)) == 20.0


def test_gpu_that_drops_out_of_the_count_stays_visible_as_down() -> None:
    backend = make_backend(3)
    registry, _ = register(backend)
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "2"}) == 1
    backend.gpus.pop()
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "2"}) == 0
    assert registry.get_sample_value("DCGM_FI_DEV_GPU_UTIL", labels_of(1, backend)) == 20.0


def test_collect_never_raises() -> None:
    backend = make_backend(2)
    backend.errors[(0, "utilization")] = RuntimeError("a bug in a backend")
    registry, _ = register(backend)
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "0"}) == 0
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 1

    backend.count_error = GpuBackendError("Driver Not Loaded")
    fams = families(registry)
    assert "DCGM_FI_DEV_GPU_UTIL" not in fams
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "1"}) == 0  # known, now down
    assert "exporter_watchdog_gpu_collect_duration_seconds" in fams


def test_xid_events_set_the_last_xid_and_count_per_gpu_and_xid() -> None:
    backend = make_backend(2)
    xids = XidWatcher(backend, poll_seconds=0.05).start()
    try:
        registry, _ = register(backend, xids=xids)
        for event in (XidEvent(1, 79), XidEvent(1, 79), XidEvent(1, 48), XidEvent(0, 13)):
            backend.xids.put(event)

        def counted() -> bool:
            return registry.get_sample_value("exporter_watchdog_gpu_xid_errors_total", {"gpu": "0", "xid": "13"}) == 1

        wait_for(counted)
        assert registry.get_sample_value("exporter_watchdog_gpu_xid_errors_total", {"gpu": "1", "xid": "79"}) == 2
        assert registry.get_sample_value("exporter_watchdog_gpu_xid_errors_total", {"gpu": "1", "xid": "48"}) == 1
        assert registry.get_sample_value("DCGM_FI_DEV_XID_ERRORS", labels_of(1, backend)) == 48
        assert registry.get_sample_value("DCGM_FI_DEV_XID_ERRORS", labels_of(0, backend)) == 13
    finally:
        xids.stop()
    assert not xids.running


def test_xid_watcher_survives_errors_and_ends_when_events_are_unsupported() -> None:
    backend = make_backend(1)
    xids = XidWatcher(backend, poll_seconds=0.05).start()
    try:
        backend.xids.put(GpuBackendError("Unknown Error"))
        backend.xids.put(XidEvent(0, 31))
        wait_for(lambda: xids.snapshot()[0].get(0) == 31)
        assert xids.running
        backend.xids.put(GpuBackendError("Not Supported", GpuErrorKind.NOT_SUPPORTED))
        wait_for(lambda: not xids.running)
    finally:
        xids.stop()


def test_concurrent_scrapes_share_one_nvml_pass() -> None:
    backend = make_backend(4)
    now = [100.0]
    registry, collector = register(backend, cache_seconds=1.0, clock=lambda: now[0])
    backend.gate = threading.Event()
    results: list[list[object]] = []
    arrived = threading.Semaphore(0)

    def scrape() -> None:
        arrived.release()
        results.append(list(collector.collect()))

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for t in threads:
        t.start()
    for _ in threads:
        assert arrived.acquire(timeout=10)
    assert backend.entered.wait(10)
    backend.gate.set()
    for t in threads:
        t.join(10)
    assert len(results) == 8
    assert collector.passes == 1
    assert backend.calls["utilization"] == 4
    assert all(r == results[0] for r in results)

    now[0] += 0.5
    list(registry.collect())
    assert collector.passes == 1  # still fresh
    now[0] += 0.6
    list(registry.collect())
    assert collector.passes == 2
    assert backend.calls["utilization"] == 8


def _cgroups(table: dict[int, list[str]]) -> Callable[[int], list[str] | None]:
    return lambda pid: table.get(pid)


def test_foreign_processes_and_derived_owners_in_exporter_only_mode() -> None:
    backend = make_backend(4)
    backend.gpus[0].procs = [GpuProcess(100, 20 << 30), GpuProcess(101, 1 << 30)]  # server + its child
    backend.gpus[1].procs = [GpuProcess(200, 5 << 30)]  # a Slurm job
    backend.gpus[2].procs = [GpuProcess(300, 1 << 30), GpuProcess(301, None), GpuProcess(200, 1 << 20)]
    table = {
        100: ["0::/user.slice/user-0.slice/session-3.scope"],
        101: ["0::/user.slice/user-0.slice/session-3.scope"],
        200: ["0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0"],
        300: ["0::/user.slice/user-1000.slice/session-9.scope"],
        # 301 vanished (or lives in another PID namespace): counted as foreign
    }
    registry, _ = register(backend, server_pids=lambda: {100, 101}, read_cgroup=_cgroups(table))
    foreign = {g: registry.get_sample_value("exporter_watchdog_gpu_foreign_processes", {"gpu": str(g)})
               for g in range(4)}
    assert foreign == {0: 0, 1: 0, 2: 2, 3: 0}
    owner = {g: [o for o in ("free", "watchdog", "slurm")
                 if registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": str(g), "owner": o}) == 1]
             for g in range(4)}
    assert owner == {0: ["watchdog"], 1: ["slurm"], 2: ["slurm"], 3: ["free"]}

    # Exporter-only with no server at all: our server's PIDs are just processes like any other.
    registry2, _ = register(backend, read_cgroup=_cgroups(table))
    assert registry2.get_sample_value("exporter_watchdog_gpu_foreign_processes", {"gpu": "0"}) == 2


def test_owners_from_the_daemon_win_and_a_failing_owners_falls_back() -> None:
    backend = make_backend(2)
    backend.gpus[1].procs = [GpuProcess(200, 1 << 30)]
    table = {200: ["4:memory:/slurm/uid_1000/job_7/step_0/task_0"]}
    mapping: dict[int, str] = {0: "watchdog", 1: "free", 5: "slurm"}
    fail = [False]

    def owners() -> dict[int, str]:
        if fail[0]:
            raise RuntimeError("no snapshot yet")
        return mapping

    registry, _ = register(backend, owners=owners, read_cgroup=_cgroups(table))

    def owner_of(gpu: int, reg: CollectorRegistry = registry) -> str:
        hits = [o for o in ("free", "watchdog", "slurm")
                if reg.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": str(gpu), "owner": o}) == 1]
        assert len(hits) == 1
        return hits[0]

    assert (owner_of(0), owner_of(1), owner_of(5)) == ("watchdog", "free", "slurm")
    fail[0] = True
    assert (owner_of(0), owner_of(1)) == ("free", "slurm")
    assert registry.get_sample_value("exporter_watchdog_gpu_owner", {"gpu": "5", "owner": "slurm"}) is None


def test_process_list_unsupported_leaves_foreign_out() -> None:
    backend = make_backend(2)
    backend.errors[(0, "compute_processes")] = GpuBackendError("Not Supported", GpuErrorKind.NOT_SUPPORTED)
    registry, _ = register(backend)
    assert registry.get_sample_value("exporter_watchdog_gpu_foreign_processes", {"gpu": "0"}) is None
    assert registry.get_sample_value("exporter_watchdog_gpu_foreign_processes", {"gpu": "1"}) == 0
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "0"}) == 1
