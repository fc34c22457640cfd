"""Helpers for detection tests: a fixture that fails a test leaking threads, and deadline polling."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

T = TypeVar("T")
# Generous: other people run tests on the same 2 cores.
DEADLINE = 20.0


def wait_until(check: Callable[[], T | None], what: str, timeout: float = DEADLINE, interval: float = 0.005) -> T:
    """Poll check() until it returns something truthy; fail the test naming what we waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        time.sleep(interval)


@pytest.fixture
def no_thread_leaks() -> Iterator[None]:
    """Fail the test when threads it started are still alive after it (given a deadline to finish)."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + DEADLINE
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
        if not leaked:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"test leaked threads: {sorted(t.name for t in leaked)}", pytrace=False)
        time.sleep(0.01)


class WakeCounter:
    """A wake() callback that counts calls, safe to call from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0

    def __call__(self) -> None:
        with self._lock:
            self._count += 1

    @property
    def count(self) -> int:
        with self._lock:
            return self._count
