"""A fixed set of threads serving many HTTP connections: idle ones cost a file descriptor, not a thread.

One thread does all socket I/O with a selector: it accepts, reads request heads as they arrive and
writes answers as fast as each client takes them. A complete head goes to a small pool of workers,
which only build the answer. So a client that trickles its request, never reads its answer, or
keeps an idle connection open holds no thread. A connection that has not sent a complete request
within `idle_timeout` seconds (a keep-alive gone quiet, or a head trickling in) is closed, as is one
that has not taken its answer within WRITE_TIMEOUT; when `max_connections` are open the one idle
longest makes room for the newcomer.
"""

from __future__ import annotations

import io
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from loguru import logger

MAX_HEAD = 64 * 1024  # request line plus headers; a GET has no body
THREAD_NICE = 10
WRITE_TIMEOUT = 10.0  # a client that has not taken its whole answer in this time is closed


class LoopFirst:
    """Lets the daemon's loop hold the HTTP workers back while it acts on a job event.

    The loop and the workers share one interpreter lock, and a yield is many system calls that each
    give it up: under a crowd of scrapers every one of them waits its turn. While held (MAX_HOLD
    seconds at most in a row, so job churn never starves /metrics), a worker waits before it starts on
    the next request; connections are still accepted, read and written.
    """

    MAX_HOLD = 0.5

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self._until = 0.0

    def hold_for(self, seconds: float) -> None:
        """Hold the workers back for `seconds` (a job event: the loop is about to act)."""
        with self._cond:
            self._until = max(self._until, self._clock() + seconds)

    def wait(self) -> None:
        """Called by a worker: return once nothing holds the workers back, or after MAX_HOLD."""
        with self._cond:
            give_up = self._clock() + self.MAX_HOLD
            while (left := min(self._until, give_up) - self._clock()) > 0:
                self._cond.wait(left)


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    address: Any
    since: float  # when it started waiting for a request, or for its answer to be taken
    buf: bytearray = field(default_factory=bytearray)  # what it sent that is not answered yet
    out: memoryview = memoryview(b"")  # the answer not yet sent
    keep: bool = True  # wait for another request once the answer is out


def lower_thread_priority() -> None:
    """Run the calling thread at THREAD_NICE (Linux: a nice value is per thread): under a crowd of
    scrapers the daemon's loop, its event threads and the node's jobs get the CPU first."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), THREAD_NICE)
    except OSError as exc:
        logger.debug("cannot lower the priority of {}: {}", threading.current_thread().name, exc)


def _head_end(buf: bytearray) -> int:
    """Index just past the blank line that ends a request head, or -1."""
    ends = [i + len(sep) for sep in (b"\r\n\r\n", b"\n\n") if (i := buf.find(sep)) >= 0]
    return min(ends) if ends else -1


class ConnectionLoop:
    """Accept on `listener` and answer each request with a fresh `handler_class` on a worker thread."""

    def __init__(self, listener: socket.socket, handler_class: type[BaseHTTPRequestHandler], *, workers: int,
                 idle_timeout: float, max_connections: int, loop_first: LoopFirst | None = None) -> None:
        self._listener = listener
        self._handler_class = handler_class
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._loop_first = loop_first
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metrics-http",
                                        initializer=lower_thread_priority)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)  # full means a wake-up is pending: a worker never blocks on it
        self._answered: deque[_Conn] = deque()  # handed back by workers (deque: thread-safe ends)
        # Oldest first (dicts keep insertion order): the ones waiting for a request, and for a write.
        self._idle: dict[_Conn, None] = {}
        self._writing: dict[_Conn, None] = {}
        self._busy: set[_Conn] = set()  # with a worker
        self._stopping = False
        self.server_address: Any = listener.getsockname()

    def open_connections(self) -> int:
        return len(self._idle) + len(self._writing) + len(self._busy)

    def serve_forever(self) -> None:
        lower_thread_priority()
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "listener")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping:
                for key, _ in self._selector.select(self._next_deadline()):
                    if key.data == "listener":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    elif key.data in self._writing:
                        self._write(key.data)
                    else:
                        self._read(key.data)
                self._take_back()
                self._expire(time.monotonic())
        finally:
            for conn in [*self._idle, *self._writing, *self._busy]:
                self._close(conn)
            self._selector.close()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._wake_r.close()
            self._wake_w.close()

    def shutdown(self) -> None:
        """Stop the loop (from another thread); it closes every connection on its way out."""
        self._stopping = True
        self._wake()

    # --- the selector thread ---------------------------------------------------------------------

    def _next_deadline(self) -> float:
        now, deadline = time.monotonic(), 1.0
        for waiting, limit in ((self._idle, self._idle_timeout), (self._writing, WRITE_TIMEOUT)):
            if waiting:
                deadline = min(deadline, next(iter(waiting)).since + limit - now)
        return max(deadline, 0.0)

    def _accept(self) -> None:
        while True:
            try:
                sock, address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, for one: leave it in the backlog
                logger.warning("metrics: accept failed: {}", exc)
                return
            if self.open_connections() >= self._max_connections:
                if not self._idle:
                    sock.close()  # every connection is mid-request: the newcomer retries
                    continue
                self._close(next(iter(self._idle)))  # the one idle longest makes room
            sock.setblocking(False)
            # An answer leaves in one write, at once: no waiting on the peer's delayed ACK (40 ms on Linux).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._wait_for_request(_Conn(sock, address, time.monotonic()))

    def _wait_for_request(self, conn: _Conn) -> None:
        conn.since = time.monotonic()
        if _head_end(conn.buf) >= 0:  # a pipelined request already read
            self._dispatch(conn)
            return
        self._idle[conn] = None
        self._selector.register(conn.sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.buf += data
        if _head_end(conn.buf) >= 0 or len(conn.buf) > MAX_HEAD:
            self._selector.unregister(conn.sock)
            del self._idle[conn]
            self._dispatch(conn)

    def _dispatch(self, conn: _Conn) -> None:
        self._busy.add(conn)
        try:
            self._pool.submit(self._answer, conn)
        except RuntimeError:  # the pool is shut down: we are stopping
            self._close(conn)

    def _take_back(self) -> None:
        while self._answered:
            conn = self._answered.popleft()
            self._busy.discard(conn)
            if self._stopping:
                self._close(conn)
                continue
            conn.since = time.monotonic()
            self._writing[conn] = None
            self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
            self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            while conn.out:
                conn.out = conn.out[conn.sock.send(conn.out):]
        except (BlockingIOError, InterruptedError):
            return  # the client's buffer is full: the selector says when it takes more
        except OSError:
            self._close(conn)
            return
        del self._writing[conn]
        self._selector.unregister(conn.sock)
        if conn.keep:
            self._wait_for_request(conn)
        else:
            self._close(conn)

    def _expire(self, now: float) -> None:
        for waiting, limit in ((self._idle, self._idle_timeout), (self._writing, WRITE_TIMEOUT)):
            while waiting:
                conn = next(iter(waiting))
                if now - conn.since < limit:
                    break
                self._close(conn)

    def _close(self, conn: _Conn) -> None:
        for waiting in (self._idle, self._writing):
            if conn in waiting:
                del waiting[conn]
                self._selector.unregister(conn.sock)
        self._busy.discard(conn)
        conn.sock.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already full (a wake-up is pending) or closed (stopped)

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    # --- a worker thread -------------------------------------------------------------------------

    def _answer(self, conn: _Conn) -> None:
        """Build the answer to the request at the front of the connection's buffer; no socket I/O."""
        try:
            if self._loop_first is not None:
                self._loop_first.wait()
            end = _head_end(conn.buf)
            oversized = end < 0
            if oversized:  # answered from what fits (the handler refuses a long line), then closed
                head, conn.buf = bytes(conn.buf[:MAX_HEAD]) + b"\r\n\r\n", bytearray()
            else:
                head, conn.buf = bytes(conn.buf[:end]), conn.buf[end:]
            out, keep = self._handle(conn, head)
            conn.out, conn.keep = memoryview(out), keep and not oversized
        except Exception as exc:  # a bug must cost this connection only
            logger.opt(exception=exc).debug("metrics: request failed")
            conn.out, conn.keep = memoryview(b""), False
        finally:
            self._answered.append(conn)
            self._wake()

    def _handle(self, conn: _Conn, head: bytes) -> tuple[bytes, bool]:
        handler = self._handler_class.__new__(self._handler_class)
        handler.server = self  # type: ignore[assignment]
        handler.request = handler.connection = conn.sock
        handler.client_address = conn.address
        handler.rfile = io.BytesIO(head)
        wfile = io.BytesIO()
        handler.wfile = wfile
        handler.close_connection = True
        handler.handle_one_request()
        # A request that came with a body (we answer only GET and HEAD) closes: its body is not parsed.
        return wfile.getvalue(), not handler.close_connection
