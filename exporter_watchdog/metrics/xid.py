"""XID errors: a thread that waits on the backend's events and keeps the last XID and counts per GPU."""

from __future__ import annotations

import threading

from loguru import logger

from exporter_watchdog.metrics.nvml import GpuBackend, GpuBackendError, XidEvent


class XidWatcher:
    """A thread that waits on the backend's XID events and keeps the last XID and counts per GPU."""

    def __init__(self, backend: GpuBackend, poll_seconds: float = 1.0) -> None:
        self._backend = backend
        self._poll = poll_seconds
        self._lock = threading.Lock()
        self._last: dict[int, int] = {}
        self._counts: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> XidWatcher:
        self._thread = threading.Thread(target=self._run, name="xid-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to end and wait for it (at most one poll interval)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def snapshot(self) -> tuple[dict[int, int], dict[tuple[int, int], int]]:
        """(last XID per GPU, count per (GPU, XID)), copied."""
        with self._lock:
            return dict(self._last), dict(self._counts)

    def _record(self, event: XidEvent) -> None:
        with self._lock:
            self._last[event.gpu] = event.xid
            key = (event.gpu, event.xid)
            self._counts[key] = self._counts.get(key, 0) + 1
        logger.warning("GPU {}: XID {}", event.gpu, event.xid)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                event = self._backend.wait_xid(self._poll)
            except GpuBackendError as exc:
                if exc.not_supported:
                    logger.info("XID events unavailable: {}", exc)
                    return
                logger.warning("XID wait failed (retrying in {:.0f} s): {}", backoff, exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            except Exception:
                logger.exception("XID wait failed (retrying in {:.0f} s)", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 60.0)
                continue
            backoff = 1.0
            if event is not None:
                self._record(event)
