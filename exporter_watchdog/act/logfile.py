"""A size-bounded log file (one backup) and the thread that pumps a server's output pipe into it."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from loguru import logger

_CHUNK = 64 * 1024


class RotatingLog:
    """Append-only file that moves itself to PATH.1 before it would grow past max_bytes."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"log max_bytes must be positive, got {max_bytes}")
        self.path = path
        self.backup = path.with_name(path.name + ".1")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab", buffering=0)  # unbuffered: a crash loses nothing already read
        self._size = self._fh.seek(0, os.SEEK_END)

    @classmethod
    def or_discard(cls, path: Path, max_bytes: int) -> tuple[RotatingLog, OSError | None]:
        """The log at path or, where it cannot be opened (disk full, read-only), one that drops everything."""
        try:
            return cls(path, max_bytes), None
        except OSError as exc:
            log = cls(Path(os.devnull), max_bytes)
            log.path = path
            log._size = 0
            log._discard = True
            return log, exc

    _discard = False

    def write(self, data: bytes) -> None:
        """Append data, rotating first when it would not fit; a chunk larger than the bound is cut."""
        with self._lock:
            if self._fh.closed:
                return
            if len(data) > self.max_bytes:
                data = data[-self.max_bytes :]  # keep the newest bytes: they say why it died
            if self._discard:
                return
            if self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._fh.write(data)
            self._size += len(data)

    def _rotate(self) -> None:
        self._fh.close()
        truncate = False
        try:
            os.replace(self.path, self.backup)
        except OSError as exc:
            # Removed from under us, or the directory refuses the rename: start over in place
            # rather than grow without bound.
            logger.warning("cannot rotate {} to {}: {}", self.path, self.backup, exc)
            truncate = True
        self._fh = open(self.path, "wb" if truncate else "ab", buffering=0)
        self._size = 0

    def close(self) -> None:
        """Close the file; later writes are dropped."""
        with self._lock:
            self._fh.close()


class PipePump:
    """A thread that copies everything read from fd into a RotatingLog until end of file."""

    def __init__(self, fd: int, log: RotatingLog, name: str = "server-log") -> None:
        self._fd = fd
        self._log = log
        # Reads no larger than the bound keep every file at or under max_bytes.
        self._chunk = max(1, min(_CHUNK, log.max_bytes))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start pumping."""
        self._thread.start()

    def _run(self) -> None:
        failing = False  # logged once per run of failures, not once per chunk
        try:
            while True:
                try:
                    data = os.read(self._fd, self._chunk)
                except InterruptedError:
                    continue
                if not data:
                    break  # every writer (the whole server tree) closed the pipe
                try:
                    self._log.write(data)
                except Exception as exc:
                    # Keep draining whatever goes wrong with the file (disk full, folder gone): a
                    # server blocked on a full pipe would hang, one facing a closed pipe would die.
                    if not failing:
                        logger.error("server log {}: {}; dropping the server's output until it can be written",
                                     self._log.path, exc)
                    failing = True
                    continue
                if failing:
                    logger.info("server log {} writable again", self._log.path)
                failing = False
        finally:
            os.close(self._fd)
            self._log.close()

    def join(self, timeout: float) -> bool:
        """Wait up to timeout for end of file; True when the pump has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()
