"""Runs the LLM server in its own session, stops its whole process tree, cleans up after a killed daemon."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from loguru import logger

from exporter_watchdog.act import procs
from exporter_watchdog.act.logfile import PipePump, RotatingLog
from exporter_watchdog.act.procs import ProcInfo

_FIRST_INTERVAL = 0.005  # the first re-check after a signal: a well-behaved server exits in ms
_MAX_INTERVAL = 0.1
_BACKOFF = 1.5
_PUMP_JOIN = 1.0  # how long stop() waits for the last output once every process is gone


@dataclass(frozen=True)
class ServerRecord:
    """What a daemon killed with SIGKILL needs to find its server again on the next start."""

    pid: int  # 0 while the server is being spawned: only the marker can find it then
    pgid: int
    sid: int
    start_ticks: int  # /proc/PID/stat starttime of the leader: tells it apart from a reused pid
    marker: str  # value of the marker variable in the server's environment, inherited by its tree
    argv: list[str]
    started_at: float  # wall clock

    def to_json(self) -> str:
        """Serialize to one JSON object."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: Path) -> ServerRecord:
        """Parse a record; ValueError naming the file and the bad key on anything malformed."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(data).__name__}")
        ints = ("pid", "pgid", "sid", "start_ticks")
        for key in ints:
            if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
                raise ValueError(f"{source}: key {key!r} must be an integer, got {data.get(key)!r}")
        if not isinstance(data.get("marker"), str) or not data["marker"]:
            raise ValueError(f"{source}: key 'marker' must be a non-empty string, got {data.get('marker')!r}")
        argv = data.get("argv")
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"{source}: key 'argv' must be a list of strings, got {argv!r}")
        started = data.get("started_at")
        if not isinstance(started, (int, float)) or isinstance(started, bool):
            raise ValueError(f"{source}: key 'started_at' must be a number, got {started!r}")
        return cls(
            pid=data["pid"],
            pgid=data["pgid"],
            sid=data["sid"],
            start_ticks=data["start_ticks"],
            marker=data["marker"],
            argv=list(argv),
            started_at=float(started),
        )


@dataclass(frozen=True)
class StopResult:
    """How a stop went."""

    duration: float  # seconds from the first signal until no process was left (or we gave up)
    escalated: bool  # SIGTERM was not enough: SIGKILL was sent
    remaining: int  # processes still alive after the whole wait (0 unless something is unkillable)


@dataclass(frozen=True)
class PollResult:
    """The server as seen right now."""

    running: bool  # some process of the server's session or group is alive
    pid: int | None  # the leader's pid while it is alive
    exited: bool  # the leader exited without stop() being called since the last poll
    exit_code: int | None  # the leader's status once it exited (negative: killed by that signal)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class _Waker:
    """Sleeps between checks, waking early when the leader exits (through its pidfd)."""

    def __init__(self, pid: int | None) -> None:
        self._fd = -1
        if pid is not None:
            try:
                self._fd = os.pidfd_open(pid)
            except OSError:
                self._fd = -1  # gone already, or no pidfds: plain polling works too

    def wait(self, timeout: float) -> None:
        if self._fd >= 0:
            if procs.wait_pidfd(self._fd, timeout):
                self.close()  # stays readable once the leader is dead: poll by time from here on
            return
        time.sleep(max(0.0, timeout))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class Supervisor:
    """Starts one server at a time in its own session and stops its whole process tree.

    One thread drives start/poll/stop/cleanup_orphan; `pid` and `started_at` may be read from any.
    """

    def __init__(
        self,
        record_path: Path,
        log_path: Path,
        *,
        term_timeout: float = 30.0,
        kill_timeout: float = 10.0,
        log_max_bytes: int = 50 * 2**20,
        proc_root: Path = procs.PROC,
        marker_env: str = "EXPORTER_WATCHDOG_SERVER",
    ) -> None:
        if term_timeout < 0 or kill_timeout < 0:
            raise ValueError(f"timeouts must be >= 0, got term={term_timeout} kill={kill_timeout}")
        if log_max_bytes <= 0:
            raise ValueError(f"log_max_bytes must be positive, got {log_max_bytes}")
        self.record_path = record_path
        self.log_path = log_path
        self.term_timeout = term_timeout
        self.kill_timeout = kill_timeout
        self.log_max_bytes = log_max_bytes
        self.proc_root = proc_root
        self.marker_env = marker_env
        self._proc: subprocess.Popen[bytes] | None = None
        self._record: ServerRecord | None = None
        self._pump: PipePump | None = None
        self._exit_code: int | None = None  # set once the leader is seen dead (still unreaped)
        self._exit_reported = False

    @property
    def pid(self) -> int | None:
        """The server leader's pid while it runs."""
        rec = self._record
        return rec.pid if rec is not None and self._exit_code is None else None

    @property
    def started_at(self) -> float | None:
        """Wall-clock start time of the current server."""
        rec = self._record
        return rec.started_at if rec is not None else None

    # ----- start ---------------------------------------------------------------------------------

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None) -> int:
        """Spawn argv with exactly env (plus the marker) in a new session; return its pid."""
        if self._proc is not None:
            raise RuntimeError(f"a server is already running (pid {self._record.pid if self._record else '?'})")
        if not argv:
            raise ValueError("server command line is empty")
        if self.record_path.exists():
            # Never lose track of a server a previous daemon left behind.
            logger.warning("server record {} exists at start: cleaning up first", self.record_path)
            self.cleanup_orphan()
        marker = secrets.token_hex(16)
        started_at = time.time()
        # Written before the spawn: a daemon killed in between still leaves the marker to search for.
        _write_atomic(
            self.record_path,
            ServerRecord(0, 0, 0, 0, marker, list(argv), started_at).to_json(),
        )
        child_env = dict(env)
        child_env[self.marker_env] = marker
        log = RotatingLog(self.log_path, self.log_max_bytes)
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                list(argv),
                env=child_env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                start_new_session=True,  # setsid(): pid == pgid == sid, no controlling terminal
                close_fds=True,
            )
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            log.close()
            self._remove_record()
            raise
        os.close(write_fd)  # only the server tree holds the write end: EOF means all of it is gone
        # The child is not reaped yet, so its /proc entry exists even if it already exited.
        info = procs.read_proc(proc.pid, self.proc_root)
        start_ticks = info.start_ticks if info is not None else 0
        record = ServerRecord(proc.pid, proc.pid, proc.pid, start_ticks, marker, list(argv), started_at)
        self._proc, self._record = proc, record
        self._exit_code, self._exit_reported = None, False
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at))
        log.write(f"--- {stamp} server pid {proc.pid}: {shlex.join(argv)}\n".encode())
        self._pump = PipePump(read_fd, log)
        self._pump.start()
        try:
            _write_atomic(self.record_path, record.to_json())
        except OSError:
            logger.error("cannot write server record {}: stopping the server", self.record_path)
            self.stop(term_timeout=0.0)
            raise
        logger.info("server started: pid {} ({})", proc.pid, shlex.join(argv))
        return proc.pid

    # ----- poll ----------------------------------------------------------------------------------

    def _leader_status(self) -> int | None:
        """The leader's exit status if it has exited, without reaping it (keeps its pid reserved)."""
        assert self._proc is not None
        if self._exit_code is not None:
            return self._exit_code
        try:
            res = os.waitid(os.P_PID, self._proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            # Reaped elsewhere (someone called waitpid(-1)): the status is lost.
            self._exit_code = self._proc.returncode if self._proc.returncode is not None else -1
            return self._exit_code
        if res is None or res.si_pid == 0:
            return None
        code = res.si_status if res.si_code == os.CLD_EXITED else -res.si_status
        self._exit_code = code
        return code

    def _session_members(self) -> list[ProcInfo]:
        assert self._record is not None
        return procs.live_members(self._record.sid, procs.list_processes(self.proc_root))

    def poll(self) -> PollResult:
        """Look at the server without blocking; forgets it once it exited and nothing is left."""
        if self._proc is None or self._record is None:
            return PollResult(running=False, pid=None, exited=False, exit_code=None)
        code = self._leader_status()
        if code is None:
            return PollResult(running=True, pid=self._record.pid, exited=False, exit_code=None)
        exited = not self._exit_reported
        if exited:
            logger.warning("server pid {} exited with status {}", self._record.pid, code)
        self._exit_reported = True
        # Children can outlive the leader and hold GPU memory: the caller should stop() them.
        members = self._session_members()
        if not members:
            self._forget(join_timeout=0.2)
        return PollResult(running=bool(members), pid=None, exited=exited, exit_code=code)

    # ----- stop ----------------------------------------------------------------------------------

    def stop(self, term_timeout: float | None = None) -> StopResult:
        """SIGTERM the server's group and session, SIGKILL at the deadline, wait until none is left."""
        if self._proc is None or self._record is None:
            self._remove_record()
            return StopResult(duration=0.0, escalated=False, remaining=0)
        t0 = time.monotonic()
        rec = self._record
        term = self.term_timeout if term_timeout is None else term_timeout
        waker = _Waker(rec.pid if self._leader_status() is None else None)
        try:
            # The leader stays unreaped until the end, so rec.pgid/rec.sid cannot be handed to a
            # newcomer while we signal them.
            escalated, remaining, _ = self._terminate(self._session_members, rec.pgid, term, waker)
        finally:
            waker.close()
        result = StopResult(duration=time.monotonic() - t0, escalated=escalated, remaining=remaining)
        if remaining:
            logger.error("server pid {}: {} process(es) survived SIGKILL", rec.pid, remaining)
        logger.info(
            "server pid {} stopped in {:.3f}s{}",
            rec.pid,
            result.duration,
            " (needed SIGKILL)" if escalated else "",
        )
        self._forget(join_timeout=_PUMP_JOIN)
        return result

    def _terminate(
        self,
        members: Callable[[], list[ProcInfo]],
        group: int | None,
        term_timeout: float,
        waker: _Waker,
    ) -> tuple[bool, int, int]:
        """Signal members() until none is left; return (escalated, remaining, processes seen)."""
        signalled: set[tuple[int, int]] = set()
        seen: set[tuple[int, int]] = set()

        def hit(sig: int, use_group: bool, again: bool) -> list[ProcInfo]:
            if use_group and group is not None:
                try:
                    os.killpg(group, sig)
                except ProcessLookupError:
                    pass  # only the zombie leader is left in the group, or nobody
                except PermissionError as exc:
                    logger.warning("killpg({}, {}): {}", group, sig, exc)
            live = members()
            for p in live:
                key = (p.pid, p.start_ticks)
                seen.add(key)
                # Group members just got sig from killpg. Each process gets SIGTERM only once: a
                # second one makes some servers abandon their graceful shutdown.
                if use_group and p.pgid == group:
                    signalled.add(key)
                if again or key not in signalled:
                    procs.signal_verified(p, sig, self.proc_root)
                    signalled.add(key)
            return live

        def wait_until_gone(sig: int, deadline: float, again: bool) -> list[ProcInfo]:
            interval = _FIRST_INTERVAL
            live = hit(sig, use_group=True, again=again)
            while live:
                now = time.monotonic()
                if now >= deadline:
                    break
                waker.wait(min(interval, deadline - now))
                interval = min(interval * _BACKOFF, _MAX_INTERVAL)
                # Processes forked since the last look get the signal too; SIGKILL is simply
                # repeated, group included.
                live = hit(sig, use_group=again, again=again)
            return live

        live = wait_until_gone(signal.SIGTERM, time.monotonic() + term_timeout, again=False)
        escalated = bool(live)
        if live:
            logger.warning("{} process(es) still alive after SIGTERM: sending SIGKILL", len(live))
            live = wait_until_gone(signal.SIGKILL, time.monotonic() + self.kill_timeout, again=True)
        return escalated, len(live), len(seen)

    def _forget(self, join_timeout: float) -> None:
        """Reap the leader if it is dead, finish the log pump, drop the record."""
        proc, pump = self._proc, self._pump
        if proc is not None and self._leader_status() is not None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - waitid said it had exited
                pass
        # A leader that could not be killed (D state) stays unreaped; Popen reaps it when collected.
        if pump is not None and not pump.join(join_timeout):
            # Something outside the session (it called setsid) still holds the output pipe.
            logger.warning("server output pipe still open after stop; leaving its reader running")
        self._proc = None
        self._record = None
        self._pump = None
        self._remove_record()

    def _remove_record(self) -> None:
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass

    # ----- orphans -------------------------------------------------------------------------------

    def load_record(self) -> ServerRecord | None:
        """The persisted record, if any; ValueError naming the file when it is malformed."""
        try:
            text = self.record_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        return ServerRecord.from_json(text, self.record_path)

    def cleanup_orphan(self) -> int:
        """Stop the server a killed daemon left behind, verified process by process; return how many."""
        if self._proc is not None:
            raise RuntimeError("cleanup_orphan() while this supervisor runs a server")
        try:
            rec = self.load_record()
        except ValueError as exc:
            logger.error("ignoring unreadable server record: {}", exc)
            self._remove_record()
            return 0
        if rec is None:
            return 0
        leader = procs.read_proc(rec.pid, self.proc_root) if rec.pid > 0 else None
        # Once the leader is proven to be ours, its session and group are ours too: the kernel
        # does not reuse that number while any member exists.
        trust_session = leader is not None and leader.alive and leader.start_ticks == rec.start_ticks
        me = os.getpid()

        def members() -> list[ProcInfo]:
            out: list[ProcInfo] = []
            for p in procs.list_processes(self.proc_root):
                if not p.alive or p.pid == me:
                    continue
                in_session = rec.pid > 0 and (p.sid == rec.sid or p.pgid == rec.pgid)
                if in_session and trust_session:
                    out.append(p)
                    continue
                # Anything else only with our marker: children that left the session, or a
                # server spawned just before the daemon died (pid 0 in the record).
                env = procs.read_environ(p.pid, self.proc_root)
                if env is not None and env.get(self.marker_env) == rec.marker:
                    out.append(p)
            return out

        found = members()
        if not found:
            logger.info("server record {}: nothing of pid {} is left", self.record_path, rec.pid)
            self._remove_record()
            return 0
        logger.warning(
            "stopping {} process(es) of a server left behind (pid {}, {})",
            len(found),
            rec.pid,
            shlex.join(rec.argv),
        )
        waker = _Waker(None)
        _, remaining, seen = self._terminate(members, None, self.term_timeout, waker)
        if remaining:
            logger.error("orphaned server pid {}: {} process(es) survived SIGKILL", rec.pid, remaining)
        self._remove_record()
        return max(seen, len(found))
