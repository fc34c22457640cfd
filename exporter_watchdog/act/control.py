"""The control socket: one JSON request per connection, one JSON answer; owner-only permissions."""

from __future__ import annotations

import json
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

Handler = Callable[[dict[str, Any]], dict[str, Any]]
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
            answer = server.handler(request)
        except ValueError as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
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
    """Send one request to the daemon listening on `path` and return its answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(payload).encode() + b"\n")
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if chunk.endswith(b"\n"):
                    break
    except FileNotFoundError:
        raise ControlError(f"no daemon is running (no control socket at {path})") from None
    except ConnectionRefusedError:
        raise ControlError(f"no daemon is running (nothing listens on {path})") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied (the socket belongs to the daemon's user)") from None
    except TimeoutError:
        raise ControlError(f"the daemon at {path} did not answer within {timeout:g} s") from None
    except OSError as exc:
        raise ControlError(f"{path}: {exc}") from None
    try:
        answer = json.loads(b"".join(chunks))
    except ValueError:
        raise ControlError(f"the daemon at {path} sent an unreadable answer") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the daemon at {path} sent an unreadable answer")
    return answer
