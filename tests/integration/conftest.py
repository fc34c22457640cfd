"""Fixtures shared by the integration tests: stub servers and a demo-node daemon, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter_watchdog.demo.llm import StubConfig, StubServer
from tests.support.daemon import FAST_DEMO, DaemonProc


@pytest.fixture
def stub_factory() -> Iterator[Callable[..., StubServer]]:
    """Start stub LLM servers on free ports (no delays unless asked); all stopped after the test."""
    servers: list[StubServer] = []

    def make(**kw: Any) -> StubServer:
        kw.setdefault("ttft_ms", 0.0)
        kw.setdefault("itl_ms", 0.0)
        server = StubServer(StubConfig(port=0, **kw))
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    """A demo-node daemon claiming 2 of 4 GPUs with a 1 s cool-down; the test starts it."""
    proc = DaemonProc(tmp_path, FAST_DEMO)
    try:
        yield proc
    finally:
        proc.stop()
