"""The control socket: one JSON request per connection, one JSON answer line (or several); owner-only permissions.

A request that takes long (a Prolog's release) is answered in two lines: `{"accepted": true}` as
soon as the daemon's loop has taken it, then the result. A client that gets no first line within a
short deadline knows the daemon is hung, not merely busy stopping the server.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from loguru import logger

Answer = dict[str, Any] | Iterator[dict[str, Any]]
Handler = Callable[[dict[str, Any]], Answer]
MAX_REQUEST = 64 * 1024


class ControlError(Exception):
    """The daemon could not be reached or answered nonsense."""



class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handler: Handler


class _Request(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        line = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("expected a JSON object")
            answer: Answer = server.handler(request)
            if isinstance(answer, dict):
                answer = iter([answer])
            for part in answer:
                self.wfile.write(json.dumps(part).encode() + b"\n")
                self.wfile.flush()
            return
        except ValueError as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        except OSError:
            return  # the client went away
        except Exception as exc:  # a handler bug must not kill the control thread
            logger.exception("control request failed")
            answer = {"ok": False, "error": f"internal error: {exc}"}
        self.wfile.write(json.dumps(answer).encode() + b"\n")


class ControlServer:
    """Serves `handler` on a Unix socket that only its owner can open (mode 0600)."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            if _alive(self.path):
                raise ControlError(f"{self.path}: another daemon is already listening here")
            self.path.unlink()
        old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            server = _Server(str(self.path), _Request)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        server.handler = self._handler
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.path.unlink(missing_ok=True)


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
