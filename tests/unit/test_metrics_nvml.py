"""NvmlBackend without a GPU: a clear start-up error, and NVML error codes mapped to their kinds."""

from __future__ import annotations

import ctypes.util

import pynvml
import pytest

from exporter_watchdog.metrics.nvml import GpuBackendError, GpuErrorKind, GpuUnavailable, NvmlBackend


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has the NVIDIA driver")
def test_open_without_a_driver_is_a_clear_error() -> None:
    with pytest.raises(GpuUnavailable, match="NVML"):
        NvmlBackend.open()


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        (pynvml.NVML_ERROR_NOT_SUPPORTED, GpuErrorKind.NOT_SUPPORTED),
        (pynvml.NVML_ERROR_GPU_IS_LOST, GpuErrorKind.LOST),
        (pynvml.NVML_ERROR_UNKNOWN, GpuErrorKind.OTHER),
        (pynvml.NVML_ERROR_NO_PERMISSION, GpuErrorKind.OTHER),
    ],
)
def test_nvml_errors_map_to_kinds(code: int, kind: GpuErrorKind) -> None:
    backend = NvmlBackend(pynvml)

    def failing_call() -> int:
        raise pynvml.NVMLError(code)

    with pytest.raises(GpuBackendError) as info:
        backend._call(failing_call)
    assert info.value.kind == kind
    assert info.value.not_supported == (kind == GpuErrorKind.NOT_SUPPORTED)
    assert info.value.lost == (kind == GpuErrorKind.LOST)
    assert "failing_call" in str(info.value)
