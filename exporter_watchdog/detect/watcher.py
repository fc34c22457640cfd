"""Wakes the daemon when a job's cgroup appears or goes: inotify through watchdog, or a polling thread."""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

from loguru import logger
from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from exporter_watchdog.detect.cgroups import (
    UNIFIED,
    is_job_dir,
    job_id_from_path,
    scan_jobs,
    scope_names,
    v1_root_names,
    watch_plan,
)

MODES = ("inotify", "poll")
_EVENT_FILTER: list[type[FileSystemEvent]] = [DirCreatedEvent, DirDeletedEvent, DirMovedEvent]
# A directory can appear between planning the watches and adding them; re-planning a few times
# closes that window, and the planner's timer covers anything rarer.
_MAX_PLAN_ROUNDS = 4


class _Handler(FileSystemEventHandler):
    """Hands every directory event to the watcher; nothing else."""

    def __init__(self, on_event: Callable[[FileSystemEvent], None]) -> None:
        self._on_event = on_event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._on_event(event)


class CgroupWatcher:
    """Watches Slurm's job cgroups of every layout and calls wake() when the set of jobs may have changed."""

    def __init__(
        self,
        cgroup_root: Path,
        node: str,
        wake: Callable[[], None],
        *,
        mode: str = "inotify",
        poll_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        replan_interval: float = 5.0,
        max_remembered: int = 10_000,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"detection mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not poll_interval > 0:
            raise ValueError(f"poll interval must be positive, not {poll_interval!r}")
        if not replan_interval > 0:
            raise ValueError(f"replan interval must be positive, not {replan_interval!r}")
        self._root = Path(cgroup_root)
        self._node = node
        self._wake = wake
        self._mode = mode
        self._poll_interval = poll_interval
        self._replan_interval = replan_interval
        self._clock = clock
        # first_seen entries are dropped by forget(); jobs that came and went between two daemon
        # scans never are, so past this many entries those whose directory is gone are dropped.
        self._max_remembered = max_remembered
        self._lock = threading.Lock()  # guards _first_seen between the event thread and callers
        self._first_seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._started = False
        self._threads: list[threading.Thread] = []
        self._observer: BaseObserver | None = None
        self._handler = _Handler(self._on_event)
        # Watches are added and removed only by the planner thread; the event handler just pokes it,
        # so the handler (which runs under the observer's lock) never waits for anything of ours.
        self._watches: dict[tuple[Path, bool], tuple[ObservedWatch, tuple[int, int]]] = {}  # -> (watch, inode)
        self._replan = threading.Event()
        self._planned = threading.Event()
        self._watch_error: OSError | None = None

    @property
    def mode(self) -> str:
        """The mode in use: "poll" when inotify was asked for but could not start."""
        return self._mode

    def start(self) -> None:
        """Record the jobs already present and begin watching; returns once the watches are in place."""
        if self._started:
            raise RuntimeError("CgroupWatcher already started")
        self._started = True
        if self._mode == "inotify":
            try:
                self._start_inotify()
            except OSError as exc:
                # No inotify (limits reached, a filesystem without it): polling still protects jobs.
                logger.warning("inotify unavailable ({}); polling {} every {} s", exc, self._root,
                               self._poll_interval)
                self._stop_threads()
                self._stop.clear()
                self._mode = "poll"
        if self._mode == "poll":
            known = self._record(scan_jobs(self._root, self._node))
            self._spawn("cgroup-poll", self._poll_loop, known)
        logger.info("watching job cgroups under {} for node {} ({})", self._root, self._node, self._mode)

    def stop(self) -> None:
        """Stop watching and join every thread this watcher started."""
        self._stop_threads()

    def first_seen(self, job_id: str) -> float | None:
        """clock() time of the earliest event or poll that showed this job, kept until forget()."""
        with self._lock:
            return self._first_seen.get(job_id)

    def forget(self, job_ids: Iterable[str]) -> None:
        """Drop first-seen times of jobs the daemon no longer tracks."""
        with self._lock:
            for job_id in job_ids:
                self._first_seen.pop(job_id, None)

    def _spawn(self, name: str, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _stop_threads(self) -> None:
        self._stop.set()
        self._replan.set()  # lets the planner see the stop
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join()
        self._watches.clear()

    # --- inotify ---------------------------------------------------------------------------------

    def _start_inotify(self) -> None:
        # watchdog warns (with a repr of every watch) when a new directory's own IN_CREATE arrives
        # after its recursive walk already watched it; that race is harmless, and each job makes it.
        warnings.filterwarnings("ignore", message="Callback with id .* already exists", category=RuntimeWarning)
        self._observer = InotifyObserver()
        self._observer.start()
        self._spawn("cgroup-watch-planner", self._plan_loop)
        self._replan.set()
        # Planning is a handful of scandir calls and inotify_add_watch; far under a second.
        if not self._planned.wait(timeout=30.0):
            raise OSError("adding the inotify watches did not finish in 30 s")
        if self._watch_error is not None:
            raise self._watch_error
        # Scanned after the watches exist, so a job is either in this scan or sends an event.
        self._record(scan_jobs(self._root, self._node))

    def _plan_loop(self) -> None:
        """Keep the watches matching watch_plan: on a new or removed layout directory, and on a timer."""
        first = True
        while not self._stop.is_set():
            self._replan.wait(timeout=self._replan_interval)
            if self._stop.is_set():
                return
            self._replan.clear()
            try:
                self._update_watches(fail_hard=first)
                if not first:
                    # Jobs made under a new directory before its watch existed send no event, and
                    # the kernel may drop events: whatever this scan finds first is recorded now.
                    present = frozenset(scan_jobs(self._root, self._node))
                    if self._record_new(present):
                        self._safe_wake()
                    self._prune(present)
            except OSError as exc:
                self._watch_error = exc
            except Exception:  # keep planning: the next round may succeed
                logger.exception("error updating cgroup watches under {}", self._root)
            finally:
                if first:
                    first = False
                    self._planned.set()

    def _update_watches(self, fail_hard: bool = False) -> None:
        """Watch what watch_plan lists now, re-watch directories made anew, drop the rest."""
        observer = self._observer
        if observer is None:
            return
        for _ in range(_MAX_PLAN_ROUNDS):
            plan = watch_plan(self._root, self._node)
            wanted: dict[tuple[Path, bool], tuple[int, int]] = {}
            for key in [(p, True) for p in plan.recursive] + [(p, False) for p in plan.shallow]:
                try:
                    st = os.stat(key[0])
                except OSError:
                    continue
                wanted[key] = (st.st_dev, st.st_ino)
            # A directory removed and made again (slurmd restarted) has a new inode and no watch.
            for key in [k for k, (_, ident) in self._watches.items() if wanted.get(k) != ident]:
                self._unschedule(observer, self._watches.pop(key)[0])
            new = [key for key in wanted if key not in self._watches]
            if not new:
                return
            for path, recursive in new:
                try:
                    watch = observer.schedule(self._handler, str(path), recursive=recursive, event_filter=_EVENT_FILTER)
                except FileNotFoundError:
                    continue  # vanished since planning: the next plan leaves it out
                except OSError as exc:  # out of inotify watches, or no inotify on this filesystem
                    if fail_hard:
                        raise
                    logger.warning("cannot watch {}: {}", path, exc)
                    continue
                self._watches[(path, recursive)] = (watch, wanted[(path, recursive)])

    @staticmethod
    def _unschedule(observer: BaseObserver, watch: ObservedWatch) -> None:
        try:
            observer.unschedule(watch)
        except (KeyError, OSError):
            pass

    def _on_event(self, event: FileSystemEvent) -> None:
        """Record the time of a job directory's creation and wake the daemon; never raises."""
        try:
            self._handle(event)
        except Exception:  # an exception here would kill the observer thread and blind the daemon
            logger.exception("error handling cgroup event {}", event)
            self._safe_wake()

    def _handle(self, event: FileSystemEvent) -> None:
        if not event.is_directory or self._stop.is_set():
            return
        now = self._clock()
        if event.event_type == "deleted":
            path = Path(os.fsdecode(event.src_path))
            if is_job_dir(path, self._root, self._node):
                self._safe_wake()
            elif self._is_layout_dir(path):
                self._replan.set()
                self._safe_wake()
            return
        # created, or moved into place (a rename lands a directory as a whole)
        raw = event.dest_path if event.event_type == "moved" and event.dest_path else event.src_path
        path = Path(os.fsdecode(raw))
        job_id = job_id_from_path(path, self._root, self._node)
        if job_id is not None:
            with self._lock:
                new = job_id not in self._first_seen
                if new:
                    self._first_seen[job_id] = now
            if new:
                self._safe_wake()
        elif self._is_layout_dir(path):
            self._replan.set()  # the planner watches it, then rescans and wakes

    def _is_layout_dir(self, path: Path) -> bool:
        """Whether path is a directory that holds job directories below it (a Slurm root, scope or slice)."""
        try:
            parts = path.relative_to(self._root).parts
        except ValueError:
            return False
        if not parts:
            return False
        name = parts[-1]
        return (
            (len(parts) == 2 and name in v1_root_names(self._node))
            or name in scope_names(self._node)
            or name.endswith(".slice")
            or parts == (UNIFIED,)
        )

    # --- polling ---------------------------------------------------------------------------------

    def _poll_loop(self, known: frozenset[str]) -> None:
        while not self._stop.wait(self._poll_interval):
            try:
                current = frozenset(scan_jobs(self._root, self._node))
                if current != known:
                    self._record(current, self._clock())
                    known = current
                    self._prune(current)
                    self._safe_wake()
            except Exception:  # keep polling: a dead poller would never wake the daemon again
                logger.exception("error polling {}", self._root)

    # --- shared ----------------------------------------------------------------------------------

    def _record_new(self, job_ids: Iterable[str]) -> bool:
        """Record jobs not seen before at the current time; whether there were any."""
        now = self._clock()
        with self._lock:
            new = [job_id for job_id in job_ids if job_id not in self._first_seen]
            for job_id in new:
                self._first_seen[job_id] = now
        return bool(new)

    def _record(self, job_ids: Iterable[str], now: float | None = None) -> frozenset[str]:
        """Set the first-seen time of jobs not seen before; return all of job_ids."""
        ids = frozenset(job_ids)
        at = self._clock() if now is None else now
        with self._lock:
            for job_id in ids:
                self._first_seen.setdefault(job_id, at)
        return ids

    def _prune(self, present: frozenset[str]) -> None:
        """Bound first_seen: when it is large, drop jobs whose directory is gone."""
        with self._lock:
            if len(self._first_seen) > self._max_remembered:
                self._first_seen = {k: v for k, v in self._first_seen.items() if k in present}

    def _safe_wake(self) -> None:
        try:
            self._wake()
        except Exception:
            logger.exception("wake callback failed")
