"""Readiness probe: a thread that GETs the server's health URL and reports when readiness flips."""

from __future__ import annotations

import threading
from collections.abc import Callable

import httpx
from loguru import logger


class HealthProbe:
    """Probes one URL every `interval` seconds in its own thread; the caller never waits on the server."""

    def __init__(self, on_change: Callable[[], None], *, interval: float = 1.0, timeout: float = 2.0,
                 name: str = "server") -> None:
        if interval <= 0 or timeout <= 0:
            raise ValueError(f"interval and timeout must be positive, got {interval} and {timeout}")
        self._on_change = on_change
        self._name = name  # what the log lines call the probed process
        self._interval = interval
        self._timeout = timeout
        self._cond = threading.Condition()
        self._url: str | None = None
        self._generation = 0  # bumped by watch(): a probe answer for an older URL is thrown away
        self._ready = False
        self._notify = False  # ready flipped in watch(); the probe thread calls on_change for it
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        """True while the last probe of the current URL answered 200."""
        return self._ready

    @property
    def url(self) -> str | None:
        """The URL being probed."""
        return self._url

    def watch(self, url: str | None) -> None:
        """Probe url from now on (None: stop probing); readiness starts over as False."""
        with self._cond:
            if self._closed:
                raise RuntimeError("HealthProbe is closed")
            if url == self._url:
                return
            if url is not None:
                httpx.URL(url)  # a malformed URL fails here, in the caller, not silently in the thread
            self._url = url
            self._generation += 1
            if self._ready:
                self._ready = False
                self._notify = True
            self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread; waits at most about one request timeout."""
        with self._cond:
            self._closed = True
            self._url = None
            self._ready = False
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(self._timeout + 1.0)

    def _run(self) -> None:
        # trust_env=False: the server is on loopback; a proxy from the environment must not be used.
        with httpx.Client(timeout=self._timeout, trust_env=False, follow_redirects=False) as client:
            while True:
                with self._cond:
                    while not self._closed and self._url is None and not self._notify:
                        self._cond.wait()
                    if self._closed:
                        return
                    url, generation = self._url, self._generation
                    notify, self._notify = self._notify, False
                if notify:
                    self._call_on_change()
                if url is None:
                    continue
                ok = self._probe(client, url)
                changed = False
                with self._cond:
                    if self._closed:
                        return
                    if generation == self._generation and ok != self._ready:
                        self._ready = ok
                        changed = True
                if changed:
                    logger.info("{} at {} is {}", self._name, url, "ready" if ok else "not ready")
                    self._call_on_change()
                with self._cond:
                    # Sleep the interval unless watch() or close() asks for attention sooner.
                    if not self._closed and generation == self._generation and not self._notify:
                        self._cond.wait(self._interval)

    def _probe(self, client: httpx.Client, url: str) -> bool:
        try:
            return client.get(url).status_code == 200
        except (httpx.HTTPError, httpx.InvalidURL):
            return False  # refused while starting, timed out when hung: not ready either way

    def _call_on_change(self) -> None:
        try:
            self._on_change()
        except Exception:  # a broken callback must not end probing
            logger.exception("health on_change callback failed")
