"""The guard: a small process beside each server that stops it within a second of the daemon's death.

The daemon holds the only write end of a pipe whose read end the guard holds. The kernel closes
that write end whenever the daemon dies, however it dies (SIGKILL, the OOM killer, a crash), so
end-of-file on the pipe is the guard's signal; no heartbeat to tune, no polling. The daemon sends
the server's record (one JSON line per change) down the pipe and `release` once the server is gone,
so the guard needs no disk. The guard lives in a session of its own (a terminal's Ctrl-C or a
group kill of the daemon does not reach it) and ignores SIGINT and SIGHUP.

Run as `python -m exporter_watchdog.act.guard --fd N ...`; the daemon side is the `Guard` class.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loguru import logger

from exporter_watchdog.act.reaper import reap_record
from exporter_watchdog.act.record import ServerRecord, load_record

RELEASE = b"release"
# SIGTERM first, SIGKILL after this: the whole tree is gone well within a second of the daemon's death.
TERM_GRACE = 0.3
KILL_TIMEOUT = 10.0


class Guard:
    """The daemon's side: spawn the guard, keep it told about the server, release it after a stop."""

    def __init__(self, marker_env: str, record_path: Path, *, python: str = sys.executable,
                 name: str = "server") -> None:
        self.marker_env = marker_env
        self.name = name
        self.record_path = record_path
        self.python = python
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd = -1
        self._record: ServerRecord | None = None

    @property
    def pid(self) -> int | None:
        """The guard's pid while it runs."""
        return self._proc.pid if self._proc is not None else None

    def spawn(self, record: ServerRecord) -> None:
        """Start a guard for `record`; OSError if the interpreter cannot be started."""
        read_fd, write_fd = os.pipe()  # both ends non-inheritable: no server or scontrol gets the write end
        try:
            proc = subprocess.Popen(
                [self.python, "-m", "exporter_watchdog.act.guard", "--fd", str(read_fd),
                 "--marker-env", self.marker_env, "--record", str(self.record_path), "--name", self.name],
                pass_fds=(read_fd,), stdin=subprocess.DEVNULL, start_new_session=True, close_fds=True,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._proc, self._write_fd = proc, write_fd
        self.update(record)

    def update(self, record: ServerRecord) -> None:
        """Tell the guard the server's current identity."""
        self._record = record
        self._send(record.to_json().encode() + b"\n")

    def check(self) -> None:
        """Start a new guard if this one died while its server runs (someone killed it)."""
        if self._proc is None or self._proc.poll() is None or self._record is None:
            return
        logger.error("the {}'s guard (pid {}) died with status {}: starting a new one",
                     self.name, self._proc.pid, self._proc.returncode)
        self._close()
        self.spawn(self._record)

    def release(self) -> None:
        """The server is gone: let the guard exit quietly and reap it."""
        if self._proc is None:
            return
        self._send(RELEASE + b"\n")
        proc = self._proc
        self._close()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            logger.warning("guard pid {} did not exit after release; killing it", proc.pid)
            proc.kill()
            proc.wait()
        self._record = None

    def _send(self, data: bytes) -> None:
        if self._write_fd < 0:
            return
        try:
            os.write(self._write_fd, data)  # one line under PIPE_BUF: written whole or not at all
        except BrokenPipeError:
            pass  # the guard died; check() replaces it

    def _close(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        self._proc = None


def watch(fd: int) -> tuple[ServerRecord | None, bool]:
    """Read the pipe until end of file; (last record, released)."""
    record: ServerRecord | None = None
    released = False
    buffer = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            return record, released
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line == RELEASE:
                released = True
            elif line:
                try:
                    record = ServerRecord.from_json(line.decode(), "guard pipe")
                    released = False
                except ValueError as exc:
                    logger.error("guard: ignoring an unreadable record: {}", exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="exporter-watchdog-guard")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--marker-env", required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--name", default="server", help="what the log calls the supervised program")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    logger.remove()
    logger.add(sys.stderr, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} guard[{process}]: {message}")
    record, released = watch(args.fd)
    if released:
        return 0
    gone_at = time.monotonic()
    if record is None:
        try:
            record = load_record(args.record)
        except ValueError as exc:
            logger.error("daemon gone; unreadable {} record: {}", args.name, exc)
            return 1
        if record is None:
            return 0
    logger.warning("the daemon is gone: stopping its {} (pid {}{})", args.name, record.pid or "?",
                   f", GPUs {record.gpus}" if record.gpus is not None else "")
    seen, remaining = reap_record(record, args.marker_env, term_timeout=TERM_GRACE, kill_timeout=KILL_TIMEOUT,
                                  exclude=frozenset({os.getpid()}))
    took = time.monotonic() - gone_at
    if remaining:
        logger.error("{} process(es) of the {} survived SIGKILL", remaining, args.name)
        return 1
    try:
        current = load_record(args.record)
    except ValueError:
        current = None
    if current is not None and current.marker == record.marker:
        args.record.unlink(missing_ok=True)
    logger.warning("{} stopped: {} process(es) gone {:.3f} s after the daemon", args.name, seen, took)
    return 0


if __name__ == "__main__":
    sys.exit(main())
