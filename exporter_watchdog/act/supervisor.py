"""Runs the LLM server in its own session (and cgroup), stops its whole tree, and never lets it outlive the daemon.

Three layers keep a server from holding a job's GPUs:
- stop(): SIGTERM, SIGKILL at the deadline, until no member is left; members are the server's
  cgroup where it has one (nothing escapes it), else its process group, session and marker;
- a guard process per server (act/guard.py) stops the tree within a second of the daemon's death;
- a record in the state dir lets the next daemon, or a Prolog with no daemon, find it again.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from exporter_watchdog.act import procs
from exporter_watchdog.act.cgroup import CgroupParent, ServerCgroup
from exporter_watchdog.act.guard import Guard
from exporter_watchdog.act.logfile import PipePump, RotatingLog
from exporter_watchdog.act.procs import ProcInfo
from exporter_watchdog.act.reaper import Waker, reap_record, terminate
from exporter_watchdog.act.record import MARKER_ENV, RECORD_ENV, RECORD_NAME, ServerRecord, load_record, write_atomic

__all__ = ["MARKER_ENV", "RECORD_NAME", "PollResult", "ServerRecord", "StopResult", "Supervisor"]

# The server's first instruction runs only once it is in its cgroup: nothing it forks can escape.
_CGROUP_SHIM = 'echo $$ > "$0" || { echo "cannot enter cgroup $0" >&2; exit 125; }; exec "$@"'
_PUMP_JOIN = 1.0  # how long stop() waits for the last output once every process is gone


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
        marker_env: str = MARKER_ENV,
        cgroup_parent: CgroupParent | None = None,
        guard: bool = True,
        name: str = "server",
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
        self.cgroup_parent = cgroup_parent
        self.name = name  # what the log calls the supervised program
        self._guard = Guard(marker_env, record_path, name=name) if guard else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._record: ServerRecord | None = None
        self._cgroup: ServerCgroup | None = None
        self._pump: PipePump | None = None
        self._exit_code: int | None = None  # set once the leader is seen dead (still unreaped)
        self._exit_reported = False
        self._record_failing = False  # the last record write failed (disk full, read-only): logged once
        self._log_failing = False  # the server log could not be opened at the last start: logged once

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

    @property
    def stop_method(self) -> str:
        """How a stop finds every process, for `status` and the log."""
        if self.cgroup_parent is not None:
            return self.cgroup_parent.describe()
        return "process group + session + marker scan (no writable cgroup)"

    @property
    def guard_pid(self) -> int | None:
        """The pid of the current server's guard, if any."""
        return self._guard.pid if self._guard is not None else None

    # ----- start ---------------------------------------------------------------------------------

    def start(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None = None,
              gpus: Sequence[int] | None = None) -> int:
        """Spawn argv with exactly env (plus the marker) in a new session; return its pid."""
        if self._proc is not None:
            raise RuntimeError(f"a server is already running (pid {self._record.pid if self._record else '?'})")
        if not argv:
            raise ValueError("server command line is empty")
        if self.record_path.exists():
            # Never lose track of a server a previous daemon left behind.
            logger.warning("{name} record {} exists at start: cleaning up first", self.record_path, name=self.name)
            self.cleanup_orphan()
        marker = secrets.token_hex(16)
        cgroup = self._make_cgroup(marker)
        record = ServerRecord(0, 0, 0, 0, marker, list(argv), time.time(),
                              gpus=None if gpus is None else sorted(gpus),
                              cgroup=str(cgroup.path) if cgroup else None, cgroup_kind=cgroup.kind if cgroup else None)
        # Written before the spawn: a daemon killed in between still leaves the marker to search for.
        self._save(record)
        try:
            if self._guard is not None:
                self._guard.spawn(record)  # before the server: no moment without one
            proc, log, read_fd = self._spawn(argv, env, cwd, marker, cgroup)
        except BaseException:
            if self._guard is not None:
                self._guard.release()
            if cgroup is not None:
                cgroup.remove()
            self._remove_record()
            raise
        # The child is not reaped yet, so its /proc entry exists even if it already exited.
        info = procs.read_proc(proc.pid, self.proc_root)
        record = record.with_pid(proc.pid, info.start_ticks if info is not None else 0)
        self._proc, self._record, self._cgroup = proc, record, cgroup
        self._exit_code, self._exit_reported = None, False
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(record.started_at))
        log.write(f"--- {stamp} server pid {proc.pid}: {shlex.join(argv)}\n".encode())
        self._pump = PipePump(read_fd, log)
        self._pump.start()
        if self._guard is not None:
            self._guard.update(record)
        self._save(record)
        logger.info("{name} started: pid {} ({})", proc.pid, shlex.join(argv), name=self.name)
        return proc.pid

    def _make_cgroup(self, marker: str) -> ServerCgroup | None:
        if self.cgroup_parent is None:
            return None
        try:
            return self.cgroup_parent.create(f"server-{marker[:12]}")
        except OSError as exc:
            logger.error("cannot create the {name}'s cgroup in {}: {}; stopping by group, session and marker",
                         self.cgroup_parent.path, exc, name=self.name)
            return None

    def _spawn(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path | None, marker: str,
               cgroup: ServerCgroup | None) -> tuple[subprocess.Popen[bytes], RotatingLog, int]:
        child_env = dict(env)
        child_env[self.marker_env] = marker
        child_env[RECORD_ENV] = str(self.record_path)
        command = list(argv)
        if cgroup is not None:
            command = ["/bin/sh", "-c", _CGROUP_SHIM, str(cgroup.procs_file), *command]
        log, error = RotatingLog.or_discard(self.log_path, self.log_max_bytes)
        if error is not None and not self._log_failing:
            logger.error("cannot open the {name} log {}: {}; the {name}'s output is dropped until it can be",
                         self.log_path, error.strerror or error, name=self.name)
        self._log_failing = error is not None
        read_fd, write_fd = os.pipe()
        try:
            proc = subprocess.Popen(
                command,
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
            log.close()
            raise
        finally:
            os.close(write_fd)  # only the server tree holds the write end: EOF means all of it is gone
        return proc, log, read_fd

    def _save(self, record: ServerRecord) -> None:
        """Persist the record; a full or read-only disk is logged once and does not stop the server.

        Only the complete record (with the leader's pid) clears a failure: the small first record of
        a start may fit where the whole one does not.
        """
        try:
            write_atomic(self.record_path, record.to_json())
        except OSError as exc:
            if not self._record_failing:
                logger.error("cannot write the {name} record {}: {} (the guard still stops the {name} if the "
                             "daemon dies; a Prolog with no daemon finds it by its marker)", self.record_path,
                             exc.strerror or exc, name=self.name)
            self._record_failing = True
            return
        if record.pid:
            if self._record_failing:
                logger.info("{name} record {} written again", self.record_path, name=self.name)
            self._record_failing = False

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

    def _members(self) -> list[ProcInfo]:
        """Live processes of the server: its cgroup, plus its session and group."""
        assert self._record is not None
        found = {p.pid: p for p in procs.live_members(self._record.sid, procs.list_processes(self.proc_root))}
        if self._cgroup is not None:
            for p in self._cgroup.members(self.proc_root):
                found.setdefault(p.pid, p)
        return list(found.values())

    def poll(self) -> PollResult:
        """Look at the server without blocking; forgets it once it exited and nothing is left."""
        if self._proc is None or self._record is None:
            return PollResult(running=False, pid=None, exited=False, exit_code=None)
        if self._guard is not None:
            self._guard.check()
        code = self._leader_status()
        if code is None:
            return PollResult(running=True, pid=self._record.pid, exited=False, exit_code=None)
        exited = not self._exit_reported
        if exited:
            logger.warning("{name} pid {} exited with status {}", self._record.pid, code, name=self.name)
        self._exit_reported = True
        # Children can outlive the leader and hold GPU memory: the caller should stop() them.
        members = self._members()
        if not members:
            self._forget(join_timeout=0.2)
        return PollResult(running=bool(members), pid=None, exited=exited, exit_code=code)

    # ----- stop ----------------------------------------------------------------------------------

    def stop(self, term_timeout: float | None = None) -> StopResult:
        """SIGTERM the server's cgroup, group and session, SIGKILL at the deadline, wait until none is left."""
        if self._proc is None or self._record is None:
            self._remove_record()
            return StopResult(duration=0.0, escalated=False, remaining=0)
        t0 = time.monotonic()
        rec, cgroup = self._record, self._cgroup
        term = self.term_timeout if term_timeout is None else term_timeout
        waker = Waker(rec.pid if self._leader_status() is None else None)
        try:
            # The leader stays unreaped until the end, so rec.pgid/rec.sid cannot be handed to a
            # newcomer while we signal them.
            escalated, remaining, _ = terminate(
                self._members, group=rec.pgid, term_timeout=term, kill_timeout=self.kill_timeout, waker=waker,
                proc_root=self.proc_root, kill_all=cgroup.kill if cgroup else None,
            )
        finally:
            waker.close()
        result = StopResult(duration=time.monotonic() - t0, escalated=escalated, remaining=remaining)
        if remaining:
            logger.error("{name} pid {}: {} process(es) survived SIGKILL", rec.pid, remaining, name=self.name)
            return result  # keep the record, the guard and the cgroup: the caller tries again
        logger.info(
            "{name} pid {} stopped in {:.3f}s{}",
            rec.pid,
            result.duration,
            " (needed SIGKILL)" if escalated else "",
            name=self.name,
        )
        self._forget(join_timeout=_PUMP_JOIN)
        return result

    def _forget(self, join_timeout: float) -> None:
        """Reap the leader if it is dead, finish the log pump, release the guard, drop the record."""
        proc, pump = self._proc, self._pump
        if proc is not None and self._leader_status() is not None:
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - waitid said it had exited
                pass
        # A leader that could not be killed (D state) stays unreaped; Popen reaps it when collected.
        if pump is not None and not pump.join(join_timeout):
            # Something outside the session (it called setsid) still holds the output pipe.
            logger.warning("{name} output pipe still open after stop; leaving its reader running", name=self.name)
        if self._guard is not None:
            self._guard.release()
        if self._cgroup is not None and not self._cgroup.remove():
            logger.warning("cannot remove the {name}'s cgroup {}", self._cgroup.path, name=self.name)
        self._proc = None
        self._record = None
        self._cgroup = None
        self._pump = None
        self._remove_record()

    def _remove_record(self) -> None:
        try:
            self.record_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove the server record {}: {}", self.record_path, exc)

    # ----- orphans -------------------------------------------------------------------------------

    def load_record(self) -> ServerRecord | None:
        """The persisted record, if any; ValueError naming the file when it is malformed."""
        return load_record(self.record_path)

    def cleanup_orphan(self) -> int:
        """Stop the server a killed daemon left behind, verified process by process; return how many."""
        if self._proc is not None:
            raise RuntimeError("cleanup_orphan() while this supervisor runs a server")
        try:
            rec = self.load_record()
        except ValueError as exc:
            logger.error("ignoring unreadable {name} record: {}", exc, name=self.name)
            self._remove_record()
            return 0
        if rec is None:
            return 0
        seen, remaining = reap_record(rec, self.marker_env, term_timeout=self.term_timeout,
                                      kill_timeout=self.kill_timeout, proc_root=self.proc_root,
                                      exclude=frozenset({os.getpid()}))
        if not seen:
            logger.info("{name} record {}: nothing of pid {} is left", self.record_path, rec.pid, name=self.name)
        else:
            logger.warning("stopped {} process(es) of a {name} left behind (pid {}, {})", seen, rec.pid,
                           shlex.join(rec.argv), name=self.name)
        if remaining:
            logger.error("orphaned {name} pid {}: {} process(es) survived SIGKILL", rec.pid, remaining, name=self.name)
        self._remove_record()
        return seen
