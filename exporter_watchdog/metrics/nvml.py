"""The narrow NVML-facing interface the GPU collector reads through, and its pynvml implementation."""

from __future__ import annotations

import ctypes
import enum
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from loguru import logger

T = TypeVar("T")


class GpuErrorKind(str, enum.Enum):
    """How a GPU read failed: it decides whether a series is left out or the GPU is marked down."""

    NOT_SUPPORTED = "not_supported"  # this GPU has no such field: leave the series out
    LOST = "lost"  # the GPU fell off the bus
    OTHER = "other"


class GpuBackendError(Exception):
    """A GPU read failed; `kind` says how."""

    def __init__(self, message: str, kind: GpuErrorKind = GpuErrorKind.OTHER) -> None:
        super().__init__(message)
        self.kind = kind

    @property
    def not_supported(self) -> bool:
        return self.kind == GpuErrorKind.NOT_SUPPORTED

    @property
    def lost(self) -> bool:
        return self.kind == GpuErrorKind.LOST


class GpuUnavailable(Exception):
    """NVML could not be started (no driver, no library): the exporter runs without GPU series."""


@dataclass(frozen=True)
class MemoryInfo:
    """Frame buffer in bytes, as nvmlDeviceGetMemoryInfo v2 reports it (`reserved` None on v1)."""

    total: int
    used: int
    free: int
    reserved: int | None


@dataclass(frozen=True)
class Utilization:
    """Percent of the last sample period the GPU (SMs) and the memory (copy engine) were busy."""

    gpu: float
    memory: float


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU; `used_memory` in bytes, None when the driver does not say."""

    pid: int
    used_memory: int | None


@dataclass(frozen=True)
class RemappedRows:
    """nvmlDeviceGetRemappedRows: rows remapped for correctable/uncorrectable errors, pending, failed."""

    correctable: int
    uncorrectable: int
    pending: bool
    failed: bool


@dataclass(frozen=True)
class MigDevice:
    """One MIG instance of a GPU: its GPU instance id, profile name (`1g.6gb`) and memory."""

    gpu_instance_id: int
    profile: str
    memory: MemoryInfo


@dataclass(frozen=True)
class GpmValues:
    """What nvmlGpmMetricsGet derives from two samples, in NVML's units: percent and MiB/s (None: not given)."""

    graphics_util: float | None = None
    sm_util: float | None = None
    sm_occupancy: float | None = None
    tensor_util: float | None = None  # any tensor pipe (HMMA, IMMA, DMMA), as DCGM's PIPE_TENSOR_ACTIVE
    dram_bw_util: float | None = None
    pcie_tx_mib_s: float | None = None
    pcie_rx_mib_s: float | None = None
    nvlink_tx_mib_s: float | None = None
    nvlink_rx_mib_s: float | None = None


@dataclass(frozen=True)
class XidEvent:
    """An XID error reported by the driver for one GPU."""

    gpu: int
    xid: int


class GpuBackend(Protocol):
    """The NVML subset the exporter needs; every per-GPU call raises GpuBackendError on failure."""

    def device_count(self) -> int: ...

    def uuid(self, gpu: int) -> str: ...

    def name(self, gpu: int) -> str: ...

    def pci_bus_id(self, gpu: int) -> str: ...

    def minor_number(self, gpu: int) -> int: ...

    def utilization(self, gpu: int) -> Utilization: ...

    def encoder_utilization(self, gpu: int) -> float: ...

    def decoder_utilization(self, gpu: int) -> float: ...

    def memory(self, gpu: int) -> MemoryInfo: ...

    def gpu_temperature(self, gpu: int) -> float: ...

    def memory_temperature(self, gpu: int) -> float: ...

    def power_mw(self, gpu: int) -> float: ...

    def total_energy_mj(self, gpu: int) -> float: ...

    def sm_clock_mhz(self, gpu: int) -> float: ...

    def mem_clock_mhz(self, gpu: int) -> float: ...

    def pcie_replay_count(self, gpu: int) -> float: ...

    def compute_processes(self, gpu: int) -> list[GpuProcess]: ...

    def driver_version(self) -> str: ...

    def remapped_rows(self, gpu: int) -> RemappedRows: ...

    def nvlink_links(self, gpu: int) -> int:
        """Active NVLink links of the GPU (0 or NOT_SUPPORTED on PCIe-only boards)."""
        ...

    def mig_devices(self, gpu: int) -> list[MigDevice]:
        """The GPU's MIG instances; NOT_SUPPORTED when MIG is off or not available."""
        ...

    def gpm_supported(self, gpu: int) -> bool: ...

    def gpm_sample(self, gpu: int) -> object:
        """Take one GPM sample (an opaque handle the caller frees with gpm_free)."""
        ...

    def gpm_metrics(self, older: object, newer: object) -> GpmValues: ...

    def gpm_free(self, sample: object) -> None: ...

    def wait_xid(self, timeout_seconds: float) -> XidEvent | None:
        """Block up to timeout_seconds for the next XID event; None on timeout."""
        ...

    def close(self) -> None: ...


class NvmlBackend:
    """GpuBackend over pynvml: NVML initialised once in open(), kept open until close()."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._event_set: Any = None
        self._event_index: dict[int, int] = {}  # id of a device handle's value -> GPU index
        self._closed = False

    @classmethod
    def open(cls) -> NvmlBackend:
        """Load and initialise NVML; raise GpuUnavailable with the reason when it cannot."""
        try:
            import pynvml
        except ImportError as exc:  # the package is a dependency; this only guards broken installs
            raise GpuUnavailable(f"pynvml (nvidia-ml-py) cannot be imported: {exc}") from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise GpuUnavailable(f"NVML init failed: {exc}") from exc
        except OSError as exc:
            raise GpuUnavailable(f"NVML library cannot be loaded: {exc}") from exc
        try:
            driver = pynvml.nvmlSystemGetDriverVersion()
        except pynvml.NVMLError:
            driver = "unknown"
        logger.info("NVML initialised (driver {})", driver)
        return cls(pynvml)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one NVML call, turning NVMLError into GpuBackendError with its kind."""
        nvml = self._nvml
        try:
            return fn(*args)
        except nvml.NVMLError as exc:
            code = getattr(exc, "value", None)
            if code == nvml.NVML_ERROR_NOT_SUPPORTED:
                kind = GpuErrorKind.NOT_SUPPORTED
            elif code == nvml.NVML_ERROR_GPU_IS_LOST:
                kind = GpuErrorKind.LOST
            else:
                kind = GpuErrorKind.OTHER
            raise GpuBackendError(f"{getattr(fn, '__name__', fn)}: {exc}", kind) from exc

    def _handle(self, gpu: int) -> Any:
        handle = self._handles.get(gpu)
        if handle is None:
            handle = self._call(self._nvml.nvmlDeviceGetHandleByIndex, gpu)
            self._handles[gpu] = handle
        return handle

    def device_count(self) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetCount))

    def uuid(self, gpu: int) -> str:
        return _text(self._call(self._nvml.nvmlDeviceGetUUID, self._handle(gpu)))

    def name(self, gpu: int) -> str:
        return _text(self._call(self._nvml.nvmlDeviceGetName, self._handle(gpu)))

    def pci_bus_id(self, gpu: int) -> str:
        info = self._call(self._nvml.nvmlDeviceGetPciInfo, self._handle(gpu))
        return _text(info.busId)

    def minor_number(self, gpu: int) -> int:
        return int(self._call(self._nvml.nvmlDeviceGetMinorNumber, self._handle(gpu)))

    def utilization(self, gpu: int) -> Utilization:
        rates = self._call(self._nvml.nvmlDeviceGetUtilizationRates, self._handle(gpu))
        return Utilization(gpu=float(rates.gpu), memory=float(rates.memory))

    def encoder_utilization(self, gpu: int) -> float:
        util, _period_us = self._call(self._nvml.nvmlDeviceGetEncoderUtilization, self._handle(gpu))
        return float(util)

    def decoder_utilization(self, gpu: int) -> float:
        util, _period_us = self._call(self._nvml.nvmlDeviceGetDecoderUtilization, self._handle(gpu))
        return float(util)

    def memory(self, gpu: int) -> MemoryInfo:
        nvml = self._nvml
        handle = self._handle(gpu)
        try:
            # v2 splits out the driver-reserved memory, so `used` matches nvidia-smi.
            mem = self._call(nvml.nvmlDeviceGetMemoryInfo, handle, nvml.nvmlMemory_v2)
            return MemoryInfo(total=mem.total, used=mem.used, free=mem.free, reserved=mem.reserved)
        except GpuBackendError as exc:
            if exc.lost:
                raise
        mem = self._call(nvml.nvmlDeviceGetMemoryInfo, handle)
        return MemoryInfo(total=mem.total, used=mem.used, free=mem.free, reserved=None)

    def gpu_temperature(self, gpu: int) -> float:
        nvml = self._nvml
        return float(self._call(nvml.nvmlDeviceGetTemperature, self._handle(gpu), nvml.NVML_TEMPERATURE_GPU))

    def memory_temperature(self, gpu: int) -> float:
        # NVML has no getter for the HBM temperature but the field API; GDDR boards do not report it.
        nvml = self._nvml
        values = self._call(nvml.nvmlDeviceGetFieldValues, self._handle(gpu), [nvml.NVML_FI_DEV_MEMORY_TEMP])
        field = values[0]
        if field.nvmlReturn == nvml.NVML_ERROR_NOT_SUPPORTED:
            raise GpuBackendError("memory temperature: Not Supported", GpuErrorKind.NOT_SUPPORTED)
        if field.nvmlReturn == nvml.NVML_ERROR_GPU_IS_LOST:
            raise GpuBackendError("memory temperature: GPU is lost", GpuErrorKind.LOST)
        if field.nvmlReturn != nvml.NVML_SUCCESS:
            raise GpuBackendError(f"memory temperature: NVML return {field.nvmlReturn}")
        return _field_value(nvml, field)

    def power_mw(self, gpu: int) -> float:
        return float(self._call(self._nvml.nvmlDeviceGetPowerUsage, self._handle(gpu)))

    def total_energy_mj(self, gpu: int) -> float:
        return float(self._call(self._nvml.nvmlDeviceGetTotalEnergyConsumption, self._handle(gpu)))

    def sm_clock_mhz(self, gpu: int) -> float:
        nvml = self._nvml
        return float(self._call(nvml.nvmlDeviceGetClockInfo, self._handle(gpu), nvml.NVML_CLOCK_SM))

    def mem_clock_mhz(self, gpu: int) -> float:
        nvml = self._nvml
        return float(self._call(nvml.nvmlDeviceGetClockInfo, self._handle(gpu), nvml.NVML_CLOCK_MEM))

    def pcie_replay_count(self, gpu: int) -> float:
        return float(self._call(self._nvml.nvmlDeviceGetPcieReplayCounter, self._handle(gpu)))

    def compute_processes(self, gpu: int) -> list[GpuProcess]:
        procs = self._call(self._nvml.nvmlDeviceGetComputeRunningProcesses, self._handle(gpu))
        out: list[GpuProcess] = []
        for p in procs:
            used = getattr(p, "usedGpuMemory", None)
            out.append(GpuProcess(pid=int(p.pid), used_memory=int(used) if used is not None else None))
        return out

    def driver_version(self) -> str:
        return _text(self._call(self._nvml.nvmlSystemGetDriverVersion))

    def remapped_rows(self, gpu: int) -> RemappedRows:
        corr, unc, pending, failed = self._call(self._nvml.nvmlDeviceGetRemappedRows, self._handle(gpu))
        return RemappedRows(correctable=int(corr), uncorrectable=int(unc), pending=bool(pending), failed=bool(failed))

    def nvlink_links(self, gpu: int) -> int:
        nvml = self._nvml
        handle = self._handle(gpu)
        active = 0
        for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", 18))):
            try:
                state = self._call(nvml.nvmlDeviceGetNvLinkState, handle, link)
            except GpuBackendError as exc:
                if exc.lost:
                    raise
                if link == 0 and exc.not_supported:
                    raise
                break  # past the last link (INVALID_ARGUMENT) or a link that does not exist
            active += 1 if state == nvml.NVML_FEATURE_ENABLED else 0
        return active

    def mig_devices(self, gpu: int) -> list[MigDevice]:
        nvml = self._nvml
        handle = self._handle(gpu)
        current, _pending = self._call(nvml.nvmlDeviceGetMigMode, handle)
        if current != nvml.NVML_DEVICE_MIG_ENABLE:
            raise GpuBackendError("MIG is disabled", GpuErrorKind.NOT_SUPPORTED)
        out: list[MigDevice] = []
        for index in range(int(self._call(nvml.nvmlDeviceGetMaxMigDeviceCount, handle))):
            try:
                mig = self._call(nvml.nvmlDeviceGetMigDeviceHandleByIndex, handle, index)
            except GpuBackendError as exc:
                if exc.lost:
                    raise
                continue  # an empty slot
            gi = int(self._call(nvml.nvmlDeviceGetGpuInstanceId, mig))
            mem = self._call(nvml.nvmlDeviceGetMemoryInfo, mig)
            profile = _mig_profile(_text(self._call(nvml.nvmlDeviceGetName, mig)))
            out.append(MigDevice(gpu_instance_id=gi, profile=profile,
                                 memory=MemoryInfo(total=mem.total, used=mem.used, free=mem.free, reserved=None)))
        return out

    def gpm_supported(self, gpu: int) -> bool:
        try:
            support = self._call(self._nvml.nvmlGpmQueryDeviceSupport, self._handle(gpu))
        except GpuBackendError as exc:
            if exc.lost:
                raise
            return False  # pre-Hopper boards, or a driver without GPM
        return bool(support.isSupportedDevice)

    def gpm_sample(self, gpu: int) -> object:
        nvml = self._nvml
        sample = self._call(nvml.nvmlGpmSampleAlloc)
        try:
            self._call(nvml.nvmlGpmSampleGet, self._handle(gpu), sample)
        except GpuBackendError:
            nvml.nvmlGpmSampleFree(sample)
            raise
        return sample

    def gpm_metrics(self, older: object, newer: object) -> GpmValues:
        nvml = self._nvml
        ids = {
            "graphics_util": nvml.NVML_GPM_METRIC_GRAPHICS_UTIL,
            "sm_util": nvml.NVML_GPM_METRIC_SM_UTIL,
            "sm_occupancy": nvml.NVML_GPM_METRIC_SM_OCCUPANCY,
            "tensor_util": nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
            "dram_bw_util": nvml.NVML_GPM_METRIC_DRAM_BW_UTIL,
            "pcie_tx_mib_s": nvml.NVML_GPM_METRIC_PCIE_TX_PER_SEC,
            "pcie_rx_mib_s": nvml.NVML_GPM_METRIC_PCIE_RX_PER_SEC,
            "nvlink_tx_mib_s": nvml.NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC,
            "nvlink_rx_mib_s": nvml.NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC,
        }
        request = nvml.c_nvmlGpmMetricsGet_t()
        request.version = nvml.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(ids)
        request.sample1 = older
        request.sample2 = newer
        for i, metric_id in enumerate(ids.values()):
            request.metrics[i].metricId = metric_id
        self._call(nvml.nvmlGpmMetricsGet, request)
        values: dict[str, float] = {}
        for i, key in enumerate(ids):
            metric = request.metrics[i]
            if metric.nvmlReturn == nvml.NVML_SUCCESS:
                values[key] = float(metric.value)
        return GpmValues(**values)

    def gpm_free(self, sample: object) -> None:
        try:
            self._nvml.nvmlGpmSampleFree(sample)
        except self._nvml.NVMLError as exc:
            logger.debug("GPM sample free: {}", exc)

    def _ensure_event_set(self) -> Any:
        """Create the XID event set on first use, registering every GPU that supports XID events."""
        with self._lock:
            if self._event_set is not None:
                return self._event_set
            nvml = self._nvml
            event_set = self._call(nvml.nvmlEventSetCreate)
            registered = 0
            for gpu in range(self.device_count()):
                try:
                    handle = self._handle(gpu)
                    self._call(nvml.nvmlDeviceRegisterEvents, handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                except GpuBackendError as exc:
                    logger.warning("GPU {}: no XID events: {}", gpu, exc)
                    continue
                self._event_index[_handle_key(handle)] = gpu
                registered += 1
            if registered == 0:
                self._call(nvml.nvmlEventSetFree, event_set)
                raise GpuBackendError("no GPU supports XID events", GpuErrorKind.NOT_SUPPORTED)
            self._event_set = event_set
            return event_set

    def wait_xid(self, timeout_seconds: float) -> XidEvent | None:
        nvml = self._nvml
        event_set = self._ensure_event_set()
        try:
            data = nvml.nvmlEventSetWait(event_set, max(int(timeout_seconds * 1000), 0))
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                return None
            lost = getattr(exc, "value", None) == nvml.NVML_ERROR_GPU_IS_LOST
            kind = GpuErrorKind.LOST if lost else GpuErrorKind.OTHER
            raise GpuBackendError(f"nvmlEventSetWait: {exc}", kind) from exc
        if not data.eventType & nvml.nvmlEventTypeXidCriticalError:
            return None
        gpu = self._event_index.get(_handle_key(data.device))
        if gpu is None:
            gpu = int(self._call(nvml.nvmlDeviceGetIndex, data.device))
        return XidEvent(gpu=gpu, xid=int(data.eventData))

    def close(self) -> None:
        """Free the event set and shut NVML down; stop the XID watcher first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            nvml = self._nvml
            try:
                if self._event_set is not None:
                    nvml.nvmlEventSetFree(self._event_set)
                nvml.nvmlShutdown()
            except nvml.NVMLError as exc:
                logger.warning("NVML shutdown: {}", exc)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _mig_profile(name: str) -> str:
    """`NVIDIA A100-SXM4-40GB MIG 1g.5gb` -> `1g.5gb`, the GPU_I_PROFILE value dcgm-exporter shows."""
    head, sep, tail = name.rpartition("MIG ")
    return tail.strip() if sep else name


def _handle_key(handle: Any) -> int:
    """A device handle is a ctypes pointer; two wrappers of one device share its address."""
    return int(ctypes.cast(handle, ctypes.c_void_p).value or 0)


def _field_value(nvml: Any, field: Any) -> float:
    kind = field.valueType
    value = field.value
    if kind == nvml.NVML_VALUE_TYPE_DOUBLE:
        return float(value.dVal)
    if kind == nvml.NVML_VALUE_TYPE_UNSIGNED_INT:
        return float(value.uiVal)
    if kind == nvml.NVML_VALUE_TYPE_UNSIGNED_LONG:
        return float(value.ulVal)
    if kind == nvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG:
        return float(value.ullVal)
    if kind == nvml.NVML_VALUE_TYPE_SIGNED_LONG_LONG:
        return float(value.sllVal)
    if kind == nvml.NVML_VALUE_TYPE_SIGNED_INT:
        return float(value.siVal)
    return float(value.usVal)
