"""The control socket: one JSON request per connection, one JSON answer; owner-only permissions.

Only the daemon's own uid and root may talk to it: the socket is born 0600, and every connection's
kernel credentials (SO_PEERCRED) are checked as well, so a socket made reachable by a wrong mode or a
shared directory still refuses other users. Root is allowed because Slurm's Prolog runs as root.

A client cannot pin the daemon: a request is at most MAX_REQUEST bytes and must arrive within
READ_DEADLINE seconds, and at most MAX_HANDLERS connections are served at once (the rest wait in
the listen backlog, where they cost the daemon nothing).

A request that takes long (a Prolog's release) is answered in two lines: `{"accepted": true}` as
soon as the daemon's loop has taken it, then the result. A client that gets no first line within a
short deadline knows the daemon is hung, not merely busy stopping the server.
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from loguru import logger

Answer = dict[str, Any] | Iterator[dict[str, Any]]
Handler = Callable[[dict[str, Any]], Answer]
MAX_REQUEST = 64 * 1024
# A request is one short line sent at once; a client that has not sent it in this time is dropped.
READ_DEADLINE = 5.0
# Connections served at once; each holds a thread and at most MAX_REQUEST bytes.
MAX_HANDLERS = 32
BACKLOG = 128
# How long the daemon reads and discards the rest of an oversized request, so the client sees the answer.
DRAIN_SECONDS = 1.0
# A refused peer is logged at most this often (with a count of the ones in between).
REFUSAL_LOG_SECONDS = 10.0


class ControlError(Exception):
    """The daemon could not be reached or answered nonsense."""


class _TooLarge(Exception):
    pass


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket, from the kernel (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def allowed_uids() -> frozenset[int]:
    """The daemon's own uid and root (Slurm runs the Prolog as root)."""
    return frozenset({os.geteuid(), 0})


class ControlServer:
    """Serves `handler` on a Unix socket that only its owner (and root) can use."""

    def __init__(self, path: Path, handler: Handler, *, allowed: Collection[int] | None = None,
                 max_handlers: int = MAX_HANDLERS, read_deadline: float = READ_DEADLINE) -> None:
        self.path = path
        self._handler = handler
        self._allowed = frozenset(allowed) if allowed is not None else allowed_uids()
        self._read_deadline = read_deadline
        self._slots = threading.BoundedSemaphore(max_handlers)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._refusals = _RateLimitedLog(REFUSAL_LOG_SECONDS)

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ControlError(f"{self.path}: another daemon is already listening here")
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(BACKLOG)
        self._sock = sock
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.path.unlink(missing_ok=True)

    # --- serving ---------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            # A free slot first: while all are busy, new clients wait in the backlog, not in threads.
            if not self._slots.acquire(timeout=0.5):
                continue
            try:
                ready, _, _ = select.select([sock], [], [], 0.5)
                if not ready:
                    self._slots.release()
                    continue
                conn, _ = sock.accept()
            except OSError as exc:
                self._slots.release()
                if not self._stopping.is_set():
                    logger.warning("control socket: accept failed: {}", exc)
                    self._stopping.wait(0.1)
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()
            except RuntimeError as exc:  # cannot start a thread (out of memory or pids)
                logger.error("control socket: cannot serve a connection: {}", exc)
                conn.close()
                self._slots.release()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                answer = self._answer(conn)
                parts = iter([answer]) if isinstance(answer, dict) else answer or iter(())
                while True:
                    try:
                        part = next(parts)
                    except StopIteration:
                        break
                    except Exception as exc:  # a handler bug must not kill the control thread
                        logger.exception("control request failed")
                        part = {"ok": False, "error": f"internal error: {exc}"}
                        parts = iter(())
                    conn.settimeout(self._read_deadline)
                    conn.sendall(json.dumps(part).encode() + b"\n")
        except OSError as exc:  # the client went away or stopped reading: nothing to answer
            logger.debug("control connection: {}", exc)
        finally:
            self._slots.release()

    def _answer(self, conn: socket.socket) -> Answer | None:
        uid = peer_uid(conn)
        if uid not in self._allowed:
            self._refusals.log(f"control socket: refused a client of uid {uid} (allowed: the daemon's uid and root)")
            refusal = {"ok": False, "error": f"permission denied: uid {uid} may not use this daemon"}
            self._answer_and_drain(conn, refusal)
            return None
        try:
            line = _read_line(conn, time.monotonic() + self._read_deadline)
        except _TooLarge:
            self._answer_and_drain(conn, {"ok": False, "error": f"bad request: larger than {MAX_REQUEST} bytes"})
            return None
        except TimeoutError:
            logger.debug("control connection: no request within {:g} s; dropped", self._read_deadline)
            return None
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
        except ValueError as exc:
            return {"ok": False, "error": f"bad request: {exc}"}
        try:
            return self._handler(request)
        except Exception as exc:  # a handler bug must not kill the control thread
            logger.exception("control request failed")
            return {"ok": False, "error": f"internal error: {exc}"}

    def _answer_and_drain(self, conn: socket.socket, answer: dict[str, Any]) -> None:
        """Answer a request we will not read, then take (and ignore) what the client still sends for at
        most DRAIN_SECONDS: closing with unread data would reset the connection and lose the answer."""
        conn.settimeout(self._read_deadline)
        conn.sendall(json.dumps(answer).encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)
        _drain(conn, time.monotonic() + DRAIN_SECONDS)


def _read_line(conn: socket.socket, deadline: float) -> bytes:
    """One request line (or everything up to EOF), by `deadline`; _TooLarge past MAX_REQUEST bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            break
        if size > MAX_REQUEST:
            raise _TooLarge
    line = b"".join(chunks).split(b"\n", 1)[0]
    if len(line) > MAX_REQUEST:
        raise _TooLarge
    return line


def _drain(conn: socket.socket, deadline: float) -> None:
    """Read and discard what the client still sends, until EOF or `deadline`."""
    try:
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            if not conn.recv(65536):
                return
    except OSError:
        return


class _RateLimitedLog:
    """A warning at most every `interval` seconds; the ones in between are counted, not lost."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._lock = threading.Lock()
        self._last = -interval
        self._skipped = 0

    def log(self, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        logger.warning("{}{}", message, f" ({skipped} more since the last such message)" if skipped else "")


def _alive(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(str(path))
        return True
    except OSError:
        return False


def request(path: Path, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Send one request to the daemon listening on `path` and return its (first) answer."""
    with Exchange(path, payload, timeout) as exchange:
        return exchange.answer(timeout)


class Exchange:
    """One request and the answer lines that follow it, each read with its own deadline."""

    def __init__(self, path: Path, payload: dict[str, Any], connect_timeout: float) -> None:
        self.path = path
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(connect_timeout)
            self._sock.connect(str(path))
            self._sock.sendall(json.dumps(payload).encode() + b"\n")
        except BaseException as exc:
            self._sock.close()
            if isinstance(exc, OSError):
                raise _control_error(path, exc, connect_timeout) from None
            raise

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def answer(self, timeout: float) -> dict[str, Any]:
        """The next answer line; ControlError when none comes within timeout."""
        try:
            while b"\n" not in self._buffer:
                self._sock.settimeout(max(timeout, 0.001))
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                self._buffer += chunk
        except OSError as exc:
            raise _control_error(self.path, exc, timeout) from None
        line, _, self._buffer = self._buffer.partition(b"\n")
        try:
            answer = json.loads(line)
        except ValueError:
            raise ControlError(f"the daemon at {self.path} sent an unreadable answer") from None
        if not isinstance(answer, dict):
            raise ControlError(f"the daemon at {self.path} sent an unreadable answer")
        return answer


def _control_error(path: Path, exc: OSError, timeout: float) -> ControlError:
    """What a failed exchange means, for people."""
    if isinstance(exc, FileNotFoundError):
        return ControlError(f"no daemon is running (no control socket at {path})")
    if isinstance(exc, ConnectionRefusedError):
        return ControlError(f"no daemon is running (nothing listens on {path})")
    if isinstance(exc, PermissionError):
        return ControlError(f"{path}: permission denied (the socket belongs to the daemon's user)")
    if isinstance(exc, TimeoutError):
        return ControlError(f"the daemon at {path} did not answer within {timeout:g} s")
    return ControlError(f"{path}: {exc}")
