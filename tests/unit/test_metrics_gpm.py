"""GPM profiling on a fake backend: two-sample maths, units, sample lifetimes, unsupported GPUs, scrape cost."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from exporter_watchdog.metrics.gpm import GPM_FAMILIES, GpmSampler, dcgm_values
from exporter_watchdog.metrics.gpu import GpuCollector
from exporter_watchdog.metrics.nvml import GpmValues, GpuBackendError, GpuErrorKind
from tests.unit.test_metrics_gpu import FakeBackend, labels_of, make_backend, no_cgroup, wait_for

MIB = 1024 * 1024


@dataclass(frozen=True)
class Counters:
    """One fake GPM sample: cumulative counters since boot, as the hardware keeps them."""

    gpu: int
    seq: int
    at: float
    elapsed_cycles: float
    sm_active_cycles: float
    tensor_cycles: float
    pcie_tx_bytes: float


@dataclass
class GpmBoard:
    """A board's running counters; `advance` moves them as a load would."""

    at: float = 0.0
    cycles: float = 0.0
    sm: float = 0.0
    tensor: float = 0.0
    pcie_tx: float = 0.0

    def advance(self, seconds: float, sm_busy: float, tensor_busy: float, pcie_bytes_s: float) -> None:
        hz = 1.5e9
        self.at += seconds
        self.cycles += seconds * hz
        self.sm += seconds * hz * sm_busy
        self.tensor += seconds * hz * tensor_busy
        self.pcie_tx += seconds * pcie_bytes_s


class GpmFake(FakeBackend):
    """FakeBackend whose GPM samples are counters; gpm_metrics derives from a pair as NVML does."""

    def __init__(self, n: int, gpm: set[int], nvlink: frozenset[int] = frozenset()) -> None:
        super().__init__(make_backend(n).gpus)
        self.boards = {g: GpmBoard() for g in gpm}
        self.live: set[int] = set()  # sample ids allocated and not yet freed
        self.pairs: list[tuple[int, int]] = []
        self.seq = 0
        for g in range(n):
            self.gpus[g].gpm = g in gpm
            self.gpus[g].nvlink = 4 if g in nvlink else 0

    def gpm_sample(self, gpu: int) -> object:
        self._get(gpu, "gpm_sample")
        b = self.boards[gpu]
        self.seq += 1
        self.live.add(self.seq)
        return Counters(gpu, self.seq, b.at, b.cycles, b.sm, b.tensor, b.pcie_tx)

    def gpm_metrics(self, older: object, newer: object) -> GpmValues:
        assert isinstance(older, Counters) and isinstance(newer, Counters)
        assert older.seq in self.live and newer.seq in self.live, "a freed sample was used"
        self._get(newer.gpu, "gpm_metrics")
        self.pairs.append((older.seq, newer.seq))
        cycles = newer.elapsed_cycles - older.elapsed_cycles
        seconds = newer.at - older.at
        if cycles <= 0 or seconds <= 0:
            raise GpuBackendError("samples too close together")
        mib_s = (newer.pcie_tx_bytes - older.pcie_tx_bytes) / seconds / MIB
        return GpmValues(sm_util=100 * (newer.sm_active_cycles - older.sm_active_cycles) / cycles,
                         tensor_util=100 * (newer.tensor_cycles - older.tensor_cycles) / cycles,
                         pcie_tx_mib_s=mib_s, nvlink_tx_mib_s=100.0, nvlink_rx_mib_s=50.0)

    def gpm_free(self, sample: object) -> None:
        assert isinstance(sample, Counters)
        assert sample.seq in self.live, "freed twice"
        self.live.discard(sample.seq)


def test_dcgm_units_from_nvml_units() -> None:
    v = GpmValues(graphics_util=50.0, sm_util=40.0, sm_occupancy=20.0, tensor_util=30.0, dram_bw_util=101.0,
                  pcie_tx_mib_s=2.0, pcie_rx_mib_s=1.0, nvlink_tx_mib_s=1000.0, nvlink_rx_mib_s=500.0)
    out = dcgm_values(v, nvlink=True)
    assert out["DCGM_FI_PROF_GR_ENGINE_ACTIVE"] == pytest.approx(0.5)
    assert out["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.4)
    assert out["DCGM_FI_PROF_SM_OCCUPANCY"] == pytest.approx(0.2)
    assert out["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == pytest.approx(0.3)
    assert out["DCGM_FI_PROF_DRAM_ACTIVE"] == 1.0  # a ratio never exceeds 1
    assert out["DCGM_FI_PROF_PCIE_TX_BYTES"] == 2 * MIB
    assert out["DCGM_FI_PROF_PCIE_RX_BYTES"] == 1 * MIB
    assert out["DCGM_FI_PROF_NVLINK_TX_BYTES"] == 1000 * MIB
    assert out["DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL"] == pytest.approx(1500 * MIB / 1e6)  # MB/s, both ways
    without = dcgm_values(v, nvlink=False)
    assert not any("NVLINK" in k for k in without)
    assert dcgm_values(GpmValues(sm_util=10.0), nvlink=True) == {"DCGM_FI_PROF_SM_ACTIVE": pytest.approx(0.1)}


def test_two_sample_maths_use_the_latest_pair_and_free_every_old_sample() -> None:
    fake = GpmFake(2, gpm={0})
    now = [0.0]
    sampler = GpmSampler(fake, interval=1.0, clock=lambda: now[0])
    sampler.sample_once()
    assert sampler.values() == {}  # one sample: nothing to derive yet

    fake.boards[0].advance(1.0, sm_busy=0.8, tensor_busy=0.5, pcie_bytes_s=10 * MIB)
    now[0] = 1.0
    sampler.sample_once()
    vals = sampler.values()[0]
    assert vals["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.8)
    assert vals["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == pytest.approx(0.5)
    assert vals["DCGM_FI_PROF_PCIE_TX_BYTES"] == pytest.approx(10 * MIB)

    # The load changes: the values are those of the last interval only, not an average since start.
    fake.boards[0].advance(2.0, sm_busy=0.1, tensor_busy=0.0, pcie_bytes_s=1 * MIB)
    now[0] = 3.0
    sampler.sample_once()
    vals = sampler.values()[0]
    assert vals["DCGM_FI_PROF_SM_ACTIVE"] == pytest.approx(0.1)
    assert vals["DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"] == 0.0
    assert fake.pairs == [(1, 2), (2, 3)]
    assert fake.live == {3}  # only the latest sample is held
    assert "DCGM_FI_PROF_NVLINK_TX_BYTES" not in vals  # no NVLink link up on this board
    sampler.stop()
    assert fake.live == set()


def test_unsupported_gpus_have_no_profiling_and_are_not_sampled() -> None:
    fake = GpmFake(3, gpm={1}, nvlink=frozenset({1}))
    now = [0.0]
    sampler = GpmSampler(fake, interval=1.0, clock=lambda: now[0])
    for step in range(3):
        fake.boards[1].advance(1.0, 0.5, 0.25, MIB)
        now[0] = float(step)
        sampler.sample_once()
    assert set(sampler.values()) == {1}
    assert fake.calls["gpm_supported"] == 3  # asked once per GPU, not per round
    assert sampler.values()[1]["DCGM_FI_PROF_NVLINK_RX_BYTES"] == 50 * MIB

    registry = CollectorRegistry()
    registry.register(GpuCollector(fake, "node7", cache_seconds=0.0, read_cgroup=no_cgroup, gpm=sampler))
    tensor = {s.labels["gpu"]: s.value for m in registry.collect() for s in m.samples
              if s.name == "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE"}
    assert tensor == {"1": pytest.approx(0.25)}  # absent on pre-Hopper boards, never an error
    assert registry.get_sample_value("exporter_watchdog_gpu_up", {"gpu": "0"}) == 1
    assert registry.get_sample_value("exporter_watchdog_gpu_collect_errors_total") == 0
    assert registry.get_sample_value("DCGM_FI_PROF_SM_ACTIVE", labels_of(1, fake)) == pytest.approx(0.5)


def test_a_failing_sample_drops_that_gpus_values_and_recovers() -> None:
    fake = GpmFake(2, gpm={0, 1})
    now = [0.0]
    sampler = GpmSampler(fake, interval=1.0, clock=lambda: now[0])

    def round_(step: float) -> None:
        for b in fake.boards.values():
            b.advance(1.0, 0.5, 0.5, MIB)
        now[0] = step
        sampler.sample_once()

    round_(0)
    round_(1)
    assert set(sampler.values()) == {0, 1}
    fake.errors[(0, "gpm_metrics")] = GpuBackendError("Unknown Error")
    round_(2)
    assert set(sampler.values()) == {1}  # no stale profile for GPU 0
    del fake.errors[(0, "gpm_metrics")]
    round_(3)  # a fresh first sample
    round_(4)
    assert set(sampler.values()) == {0, 1}
    assert len(fake.live) == 2  # one held per GPU, nothing leaked on the error path

    fake.errors[(1, "gpm_sample")] = GpuBackendError("GPU is lost", GpuErrorKind.LOST)
    round_(5)
    assert set(sampler.values()) == {0}
    assert len(fake.live) == 1


def test_values_go_stale_when_the_sampler_stops_and_the_scrape_never_samples() -> None:
    fake = GpmFake(1, gpm={0})
    now = [0.0]
    sampler = GpmSampler(fake, interval=1.0, clock=lambda: now[0])
    sampler.sample_once()
    fake.boards[0].advance(1.0, 0.5, 0.5, MIB)
    now[0] = 1.0
    sampler.sample_once()
    registry = CollectorRegistry()
    registry.register(GpuCollector(fake, "node7", cache_seconds=0.0, read_cgroup=no_cgroup, gpm=sampler))
    before = fake.calls["gpm_sample"], fake.calls["gpm_metrics"]
    for _ in range(5):
        assert registry.get_sample_value("DCGM_FI_PROF_SM_ACTIVE", labels_of(0, fake)) == pytest.approx(0.5)
    assert (fake.calls["gpm_sample"], fake.calls["gpm_metrics"]) == before  # scrapes only copy numbers
    now[0] = 4.5  # more than three intervals without a sample
    assert registry.get_sample_value("DCGM_FI_PROF_SM_ACTIVE", labels_of(0, fake)) is None


def test_the_thread_samples_on_its_own_and_stops() -> None:
    fake = GpmFake(1, gpm={0})
    sampler = GpmSampler(fake, interval=0.05).start()
    try:
        wait_for(lambda: sampler.rounds >= 3)
        assert sampler.running
    finally:
        sampler.stop()
    assert not sampler.running
    assert fake.live == set()
    with pytest.raises(ValueError, match="must be > 0"):
        GpmSampler(fake, interval=0)


def test_every_gpm_family_is_a_dcgm_exporter_name() -> None:
    assert set(GPM_FAMILIES) >= {
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_SM_OCCUPANCY",
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES",
        "DCGM_FI_PROF_PCIE_RX_BYTES"}
