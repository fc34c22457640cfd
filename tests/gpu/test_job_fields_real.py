"""The newer fields over real NVML (skipped without an NVIDIA GPU): driver version, remapped rows, MIG, GPM
profiling under a CUDA busy loop (driver API through ctypes), and the scrape time with GPM and hpc_job on."""

from __future__ import annotations

import ctypes
import ctypes.util
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from exporter_watchdog.metrics.gpm import GpmSampler
from exporter_watchdog.metrics.gpu import DRIVER_LABEL, GpuCollector
from exporter_watchdog.metrics.http import MetricsServer
from exporter_watchdog.metrics.jobs import GpuJob
from exporter_watchdog.metrics.nvml import GpuBackendError, GpuUnavailable, NvmlBackend

pytestmark = pytest.mark.gpu

# A kernel that spins on FMAs for `n` iterations: enough to keep SMs busy with no toolkit installed
# (the driver JIT-compiles the PTX).
SPIN_PTX = textwrap.dedent("""\
    .version 7.0
    .target sm_70
    .address_size 64
    .visible .entry spin(.param .u64 n)
    {
        .reg .pred %p;
        .reg .u64 %rd<3>;
        .reg .f32 %f<2>;
        ld.param.u64 %rd1, [n];
        mov.u64 %rd2, 0;
        mov.f32 %f1, 0f3F800000;
    LOOP:
        fma.rn.f32 %f1, %f1, 0f3F7FFFFF, 0f00000000;
        add.u64 %rd2, %rd2, 1;
        setp.lt.u64 %p, %rd2, %rd1;
        @%p bra LOOP;
        ret;
    }
""")

# Runs in a child process: a CUDA context on GPU 0 launching the spin kernel until it is killed.
BUSY_LOOP = textwrap.dedent(f"""\
    import ctypes, sys
    cuda = ctypes.CDLL("libcuda.so.1")
    def ok(code, what):
        if code != 0:
            sys.exit(f"{{what}} failed: {{code}}")
    ok(cuda.cuInit(0), "cuInit")
    dev = ctypes.c_int()
    ok(cuda.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    ctx = ctypes.c_void_p()
    ok(cuda.cuCtxCreate_v2(ctypes.byref(ctx), 0, dev), "cuCtxCreate")
    module = ctypes.c_void_p()
    ok(cuda.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p({SPIN_PTX.encode()!r})), "cuModuleLoadData")
    fn = ctypes.c_void_p()
    ok(cuda.cuModuleGetFunction(ctypes.byref(fn), module, b"spin"), "cuModuleGetFunction")
    n = ctypes.c_uint64(20_000_000)
    args = (ctypes.c_void_p * 1)(ctypes.cast(ctypes.pointer(n), ctypes.c_void_p))
    print("running", flush=True)
    while True:
        ok(cuda.cuLaunchKernel(fn, 1024, 1, 1, 256, 1, 1, 0, None, args, None), "cuLaunchKernel")
        ok(cuda.cuCtxSynchronize(), "cuCtxSynchronize")
""")


@pytest.fixture(scope="module")
def backend() -> Iterator[NvmlBackend]:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi")
    try:
        b = NvmlBackend.open()
    except GpuUnavailable as exc:
        pytest.skip(f"no GPU: {exc}")
    if b.device_count() == 0:
        b.close()
        pytest.skip("NVML sees no GPU")
    yield b
    b.close()


def smi(query: str) -> list[str]:
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                         check=True, capture_output=True, text=True, timeout=60).stdout
    return [line.strip() for line in out.strip().splitlines()]


def test_driver_label_remapped_rows_and_mig_match_nvidia_smi(backend: NvmlBackend) -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector(backend, socket.gethostname(), cache_seconds=0.0,
                                   jobs=lambda: {"0": (GpuJob("4242"),)}))
    fams = {m.name: m for m in registry.collect()}
    util = fams["DCGM_FI_DEV_GPU_UTIL"].samples
    driver = smi("driver_version")[0]
    assert all(s.labels[DRIVER_LABEL] == driver for s in util)
    assert [s.labels.get("hpc_job") for s in util if s.labels["gpu"] == "0"] == ["4242"]
    assert all("hpc_job" not in s.labels for s in util if s.labels["gpu"] != "0")
    for gpu in range(backend.device_count()):
        try:
            rows = backend.remapped_rows(gpu)
        except GpuBackendError as exc:
            assert exc.not_supported, exc  # pre-Ampere boards have no row remapper
            continue
        labels = {"gpu": str(gpu)}
        got = {s.name: s.value for name in ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
                                            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE")
               for s in fams[name].samples if all(s.labels.get(k) == v for k, v in labels.items())}
        print(f"GPU {gpu}: remapped rows {rows}; exported {got}")
        assert got["DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS"] == rows.uncorrectable
    modes = smi("mig.mode.current")
    for gpu, mode in enumerate(modes):
        mig = [s for s in fams["DCGM_FI_DEV_FB_USED"].samples if s.labels["gpu"] == str(gpu) and "GPU_I_ID" in s.labels]
        assert bool(mig) == (mode == "Enabled"), f"GPU {gpu}: MIG {mode}, MIG series {mig}"


def test_gpm_fields_are_non_zero_while_a_cuda_loop_runs(backend: NvmlBackend) -> None:
    if not backend.gpm_supported(0):
        pytest.skip("GPU 0 has no GPM (pre-Hopper)")
    if ctypes.util.find_library("cuda") is None:
        pytest.skip("no libcuda for the load")
    sampler = GpmSampler(backend, interval=0.5).start()
    load = subprocess.Popen([sys.executable, "-c", BUSY_LOOP], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None and load.stdout.readline().strip() == "running", "CUDA load did not start"
        deadline = time.monotonic() + 30
        values: dict[str, float] = {}
        while time.monotonic() < deadline:
            values = sampler.values().get(0, {})
            if values.get("DCGM_FI_PROF_SM_ACTIVE", 0) > 0.2 and values.get("DCGM_FI_PROF_GR_ENGINE_ACTIVE", 0) > 0.2:
                break
            time.sleep(0.25)
        print(f"\nGPU 0 under a CUDA spin loop: {values}")
        assert values.get("DCGM_FI_PROF_SM_ACTIVE", 0) > 0.2, values
        assert values.get("DCGM_FI_PROF_GR_ENGINE_ACTIVE", 0) > 0.2, values
        assert 0 < values.get("DCGM_FI_PROF_SM_OCCUPANCY", 0) <= 1, values
    finally:
        load.kill()
        load.wait(30)
        sampler.stop()


def test_scrape_time_with_gpm_and_jobs_on_real_nvml(backend: NvmlBackend) -> None:
    count = backend.device_count()
    jobs = {str(g): (GpuJob(str(1000 + g // 2), "alice", "gpu"),) for g in range(count // 2)}  # jobs on half
    sampler = GpmSampler(backend, interval=1.0).start()
    registry = CollectorRegistry()
    registry.register(GpuCollector(backend, socket.gethostname(), cache_seconds=0.0, jobs=lambda: jobs, gpm=sampler))
    server = MetricsServer("127.0.0.1:0", registry, dict, lambda: True).start()
    try:
        time.sleep(2.5)  # two GPM samples
        times: list[float] = []
        with httpx.Client() as client:
            for _ in range(200):
                started = time.perf_counter()
                r = client.get(f"http://127.0.0.1:{server.port}/metrics", headers={"Accept-Encoding": "gzip"})
                times.append(time.perf_counter() - started)
                assert r.status_code == 200
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        last_pass = registry.get_sample_value("exporter_watchdog_gpu_collect_duration_seconds")
        print(f"\n{count} GPU(s), real NVML, GPM on, jobs on {len(jobs)}: {series} series, median scrape "
              f"{statistics.median(times) * 1000:.2f} ms, p90 {sorted(times)[int(len(times) * 0.9)] * 1000:.2f} ms, "
              f"last NVML pass {(last_pass or 0) * 1000:.2f} ms")
    finally:
        server.stop()
        sampler.stop()
