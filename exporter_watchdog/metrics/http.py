"""The read-only HTTP side: /metrics, /healthz (and dcgm-exporter's /health), /status."""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry

from exporter_watchdog.metrics.connections import ConnectionLoop, LoopFirst
from exporter_watchdog.metrics.exposition import CONTENT_TYPE, render_text

# Below this size gzip costs more time than the bytes it saves on loopback or a LAN.
GZIP_MIN_BYTES = 4096


class SharedRender:
    """The /metrics body, rendered once for every scrape that comes within `max_age` seconds while
    `key()` returns the same object (the daemon's snapshot: a loop iteration makes a new one, so a
    scrape never shows counters older than the state it reports). A crowd of scrapers then costs
    one rendering per `max_age` instead of one each."""

    def __init__(self, registry: CollectorRegistry, key: Callable[[], object] | None = None, max_age: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._registry = registry
        self._key = key
        self._max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()  # one rendering at a time; the scrapes waiting for it share it
        self._made: tuple[object, float, bytes] | None = None
        self._gzipped: bytes | None = None

    def body(self, gzipped: bool = False) -> bytes:
        with self._lock:
            key = self._key() if self._key is not None else None
            made = self._made
            if made is None or made[0] is not key or self._clock() - made[1] >= self._max_age:
                made = self._made = (key, self._clock(), render_text(self._registry))
                self._gzipped = None
            if not gzipped:
                return made[2]
            if self._gzipped is None:
                self._gzipped = gzip.compress(made[2], compresslevel=1)
            return self._gzipped


def parse_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 as "[::1]:9400"); raise ValueError naming the value when malformed."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"listen address {listen!r}: expected HOST:PORT with PORT in 0-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port_text)


def _accepts_gzip(header: str | None) -> bool:
    for part in (header or "").split(","):
        token, _, params = part.strip().partition(";")
        if token.strip().lower() == "gzip":
            return params.replace(" ", "") not in ("q=0", "q=0.0")
    return False


# Threads that build answers (all socket I/O is on one selector thread). Rendering holds the
# interpreter lock, so more workers would not answer faster; they would only make the daemon's loop
# wait longer for the lock (benchmarks/metrics_load.py). Two: one slow request does not stall the rest.
WORKERS = 2
# A keep-alive connection quiet this long is closed; longer than Prometheus's default 15 s interval.
IDLE_TIMEOUT = 30.0
# Open connections at most; past it the one idle longest is closed to make room.
MAX_CONNECTIONS = 256
BACKLOG = 256


class MetricsServer:
    """Serves the registry and the daemon's health and status on a background thread."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        status: Callable[[], dict[str, Any]],
        healthy: Callable[[], bool],
        *,
        workers: int = WORKERS,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
        loop_first: LoopFirst | None = None,
        render_key: Callable[[], object] | None = None,
        render_max_age: float = 0.0,
    ) -> None:
        self._host, self._port = parse_listen(listen)
        self._registry = registry
        self._status = status
        self._healthy = healthy
        self._workers = workers
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._loop_first = loop_first
        self._render = SharedRender(registry, render_key, render_max_age)
        self._server: ConnectionLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port (the free one picked when asked for port 0)."""
        if self._server is None:
            return self._port
        return int(self._server.server_address[1])

    def start(self) -> MetricsServer:
        """Bind and serve; raise OSError naming the address when it cannot bind."""
        handler = _make_handler(self._render, self._status, self._healthy)
        sock = socket.socket(socket.AF_INET6 if ":" in self._host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self._host, self._port))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {self._host}:{self._port}: {exc.strerror}") from exc
        self._server = ConnectionLoop(sock, handler, workers=self._workers, idle_timeout=self._idle_timeout,
                                      max_connections=self._max_connections, loop_first=self._loop_first)
        self._thread = threading.Thread(target=self._serve, args=(self._server, sock), name="metrics-http",
                                        daemon=True)
        self._thread.start()
        logger.info("metrics on http://{}:{}/metrics", self._host, self.port)
        return self

    def open_connections(self) -> int:
        """Connections open right now (idle keep-alives included)."""
        return self._server.open_connections() if self._server is not None else 0

    @staticmethod
    def _serve(loop: ConnectionLoop, sock: socket.socket) -> None:
        try:
            loop.serve_forever()
        except Exception:
            logger.exception("the metrics server stopped")
        finally:
            sock.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the socket and every connection, and wait for the serving thread."""
        if self._server is None:
            return
        self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None


def _make_handler(
    render: SharedRender, status: Callable[[], dict[str, Any]], healthy: Callable[[], bool]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: Prometheus reuses its connection between scrapes
        # ConnectionLoop buffers each answer into one write and sets TCP_NODELAY (with Nagle on, a second
        # small write on a keep-alive connection waits for the peer's delayed ACK, 40 ms on Linux); it
        # reads whole request heads before a worker sees them, so a stalled client costs no thread.
        server_version = "exporter-watchdog"

        def do_GET(self) -> None:
            self._answer(head=False)

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def _not_allowed(self) -> None:
            self.close_connection = True  # a request body we do not read must not be parsed as the next request
            self._send(405, b"method not allowed: the HTTP side is read-only\n", "text/plain; charset=utf-8",
                       extra={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed

        def _answer(self, head: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._metrics(head)
            elif path in ("/healthz", "/health"):
                try:
                    ok = bool(healthy())
                except Exception:
                    logger.exception("health check failed")
                    ok = False
                body = b"ok\n" if ok else b"unhealthy: the daemon loop is not advancing\n"
                self._send(200 if ok else 503, body, "text/plain; charset=utf-8", head=head)
            elif path == "/status":
                try:
                    body = json.dumps(status(), indent=2, sort_keys=True, default=str).encode() + b"\n"
                except Exception as exc:
                    logger.exception("status failed")
                    body = json.dumps({"error": str(exc)}).encode() + b"\n"
                    self._send(500, body, "application/json", head=head)
                    return
                self._send(200, body, "application/json", head=head)
            else:
                self._send(404, b"not found: try /metrics, /healthz or /status\n", "text/plain; charset=utf-8",
                           head=head)

        def _metrics(self, head: bool) -> None:
            try:
                body = render.body()
                extra: dict[str, str] = {}
                if len(body) >= GZIP_MIN_BYTES and _accepts_gzip(self.headers.get("Accept-Encoding")):
                    body = render.body(gzipped=True)
                    extra["Content-Encoding"] = "gzip"
            except Exception as exc:  # collectors are guarded; this is the last line of defence
                logger.exception("rendering /metrics failed")
                self._send(500, f"error: {exc}\n".encode(), "text/plain; charset=utf-8", head=head)
                return
            self._send(200, body, CONTENT_TYPE, head=head, extra=extra)

        def _send(self, code: int, body: bytes, ctype: str, head: bool = False,
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            logger.trace("http {} {}", self.client_address[0], format % args)

    return Handler
