"""The daemon loop: wake on events or a timer, re-read the world, decide, act, publish a snapshot."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from loguru import logger

from exporter_watchdog.act.statefile import record_cold_start, set_active_profile
from exporter_watchdog.config import Config
from exporter_watchdog.core.decide import decide, gpu_owners
from exporter_watchdog.core.model import (
    CountConflict,
    Job,
    JobSource,
    Observation,
    Phase,
    Policy,
    ServerObs,
    Snapshot,
    StartConnector,
    StartRule,
    StartServer,
    State,
    StopConnector,
    StopServer,
    TunnelObs,
)
from exporter_watchdog.metrics.daemon import DaemonMetrics
from exporter_watchdog.profiles import LaunchSpec, Profile, ProfileError, build_launch, check_runnable, find_profile
from exporter_watchdog.profiles import models_dir as profiles_dir

# While a server starts, or a deadline (cool-down, backoff) is near, the loop wakes at least this often.
FAST_TICK = 0.5
# How long an unanswered prolog request keeps the GPUs off-limits when no job cgroup ever shows up.
PROLOG_TTL = 300.0
# Do not ask Slurm about the same unresolved job more often than this (it may be down).
REQUERY_SECONDS = 1.0
# While the tunnel connector drains or waits to (re)start, the loop looks at it this often.
TUNNEL_TICK = 0.1


class JobQueryLike(Protocol):
    @property
    def gpus(self) -> frozenset[int] | None: ...
    @property
    def duration(self) -> float: ...
    @property
    def error(self) -> str | None: ...


class SlurmLike(Protocol):
    def query_job(self, job_id: str) -> JobQueryLike: ...


class WatcherLike(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def first_seen(self, job_id: str) -> float | None: ...
    def forget(self, job_ids: Iterable[str]) -> None: ...


class SupervisorLike(Protocol):
    @property
    def pid(self) -> int | None: ...
    @property
    def started_at(self) -> float | None: ...
    @property
    def stop_method(self) -> str: ...
    @property
    def guard_pid(self) -> int | None: ...
    def start(self, argv: Any, env: Any, cwd: Any = None, gpus: Any = None) -> int: ...
    def poll(self) -> Any: ...
    def stop(self, term_timeout: float | None = None) -> Any: ...


class HealthLike(Protocol):
    @property
    def ready(self) -> bool: ...
    def watch(self, url: str | None) -> None: ...
    def close(self) -> None: ...


class ConnectorLike(Protocol):
    @property
    def stopping(self) -> bool: ...
    @property
    def restarts(self) -> int: ...
    def start(self) -> bool: ...
    def stop(self) -> None: ...
    def observe(self) -> TunnelObs: ...
    def close(self, timeout: float | None = None) -> None: ...


@dataclass
class ReleaseTicket:
    """A prolog asked for GPUs; answered once none of them is ours any more."""

    job_id: str
    gpus: frozenset[int]
    seen_at: float
    done: threading.Event
    taken: threading.Event  # the loop has seen the request: it is alive and acting on it
    cgroup_seen: bool = False


def policy_from(config: Config, node_gpus: int, profile: Profile | None) -> Policy:
    startup = config.server.startup_timeout_seconds or (profile.startup_timeout_seconds if profile else 900.0)
    return Policy(
        claim_gpus=config.claim.gpus or node_gpus,
        cooldown_seconds=config.claim.cooldown_seconds,
        yield_on_any_job=config.claim.yield_on_any_job,
        startup_timeout_seconds=startup,
        backoff_initial_seconds=config.server.backoff_initial_seconds,
        backoff_max_seconds=config.server.backoff_max_seconds,
        start_rule=StartRule(config.claim.start_rule),
        cold_start_seconds=cold_start_seconds(config, profile) or 0.0,
        tunnel_grace_seconds=config.tunnel.grace_seconds,
    )


def cold_start_seconds(config: Config, profile: Profile | None) -> float | None:
    """The expected start-to-ready time: server.cold_start_seconds, else the profile's (None: unknown)."""
    if config.server.cold_start_seconds is not None:
        return config.server.cold_start_seconds
    return profile.cold_start_seconds if profile is not None else None


class Daemon:
    """Owns the state; every other thread only wakes it, asks it something, or reads its snapshot."""

    def __init__(
        self,
        config: Config,
        *,
        node_gpus: int,
        scan_jobs: Callable[[], Mapping[str, Any]],
        slurm: SlurmLike,
        watcher: WatcherLike | None,
        supervisor: SupervisorLike,
        health_factory: Callable[[Callable[[], None]], HealthLike],
        metrics: DaemonMetrics,
        gpu_job_processes: Callable[[tuple[int, ...]], Mapping[str, set[int]]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        profile_loader: Callable[[str], Profile] | None = None,
        scan_source: JobSource = JobSource.CGROUP,
        connector: ConnectorLike | None = None,
    ) -> None:
        self.config = config
        self.node_gpus = node_gpus
        self._scan_jobs = scan_jobs
        self._scan_source = scan_source  # what scan_jobs reads: job cgroups, or squeue's listing
        self._slurm = slurm
        self._watcher = watcher
        self._supervisor = supervisor
        self._connector = connector  # the tunnel connector, when tunnel.enabled
        self._shutting_down = False
        self._tunnel = TunnelObs(enabled=connector is not None)
        self._metrics = metrics
        self._gpu_job_processes = gpu_job_processes
        self._clock = clock
        self._wall = wall
        self._load_profile = profile_loader or (lambda name: find_profile(profiles_dir(self.config), name))
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the request fields below and the snapshot
        self._stop_requested = False
        self._restart_requested = False
        self._pending_profile: Profile | None = None
        self._pending_config: Config | None = None
        self._releases: list[ReleaseTicket] = []
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scontrol")
        self._health = health_factory(self.wake)

        self.profile: Profile | None = None
        self.disabled_reason: str | None = None
        self.state = State(phase_since=clock())
        self.policy = policy_from(config, node_gpus, None)
        self._known: dict[str, frozenset[int] | None] = {}  # job id -> GPUs (None: Slurm did not say)
        self._job_owner: dict[str, tuple[str | None, str | None]] = {}  # job id -> (user, partition), for metrics
        self._last_query: dict[str, float] = {}
        self._launch: LaunchSpec | None = None
        self._start_failed: str | None = None
        self._starts = 0
        self._harvested = 0.0
        self._idle = 0.0
        self._last_tick: float | None = None
        self._last_jobs: tuple[Job, ...] = ()
        self._heartbeat = clock()
        self._snapshot = self._make_snapshot(ServerObs())

    # --- called from other threads ---------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    def loop_alive(self, stuck_after: float) -> bool:
        """False when the loop has not finished an iteration for `stuck_after` seconds."""
        return self._clock() - self.snapshot().loop_heartbeat < stuck_after

    def request_stop(self) -> None:
        with self._lock:
            self._stop_requested = True
        self.wake()

    def request_reload(self, config: Config) -> None:
        with self._lock:
            self._pending_config = config
        self.wake()

    def request_switch(self, name: str) -> dict[str, Any]:
        """Make `name` the active profile (kept across restarts) and restart the server on it."""
        try:
            profile = self._load_profile(name)
        except ProfileError as exc:
            return {"ok": False, "error": str(exc)}
        why = check_runnable(profile, self.config, self.policy.claim_gpus)
        if why:
            return {"ok": False, "error": why}
        set_active_profile(self.config.state_dir, profile.name, self.config.server.profile)
        with self._lock:
            self._pending_profile = profile
        self.wake()
        logger.info("switching to profile {}", profile.name)
        return {"ok": True, "profile": profile.name}

    def submit_release(self, job_id: str, gpus: Iterable[int]) -> ReleaseTicket | None:
        """A job's prolog: hand these GPUs back if they are ours. None when they are not (nothing to wait for).

        Otherwise the caller waits on the ticket: `taken` once the loop has seen the request (the
        loop is alive), `done` once none of the GPUs is ours any more.
        """
        wanted = frozenset(gpus)
        started = self._clock()
        # The core's claim, not the published snapshot: it already holds GPUs the loop is about to
        # start a server on, so a release that races with a start still waits for the stop.
        state = self.state
        holding = state.phase in (Phase.STARTING, Phase.SERVING, Phase.YIELDING) or self._supervisor.pid is not None
        ours = holding and bool(wanted & set(state.claimed))
        release = ReleaseTicket(job_id, wanted, started, threading.Event(), threading.Event())
        with self._lock:
            self._releases.append(release)
        self.wake()
        if not ours:
            # Not ours: the job is not delayed, but the GPUs stay off-limits until its cgroup shows up.
            release.done.set()
            return None
        return release

    def request_release(self, job_id: str, gpus: Iterable[int], timeout: float) -> dict[str, Any]:
        """submit_release() and wait up to timeout for our server to be gone."""
        started = self._clock()
        release = self.submit_release(job_id, gpus)
        if release is None:
            return {"ok": True, "released": False, "waited": 0.0}
        return self.await_release(release, started, timeout)

    def await_release(self, release: ReleaseTicket, started: float, timeout: float) -> dict[str, Any]:
        """The final answer to a release: once our server is gone, or at the deadline."""
        finished = release.done.wait(max(0.0, timeout - (self._clock() - started)))
        waited = self._clock() - started
        return {"ok": True, "released": finished, "waited": round(waited, 4), "timed_out": not finished}

    # --- the loop --------------------------------------------------------------------------------

    def start(self, profile: str | None) -> None:
        """Pick the profile (the one `switch` chose, else the config's) and start watching; then `run()`."""
        self._select_profile(profile)
        if self._watcher is not None:
            self._watcher.start()

    def run(self) -> None:
        """Loop until request_stop(); stops the server before returning."""
        deadline = None
        try:
            while True:
                with self._lock:
                    stopping = self._stop_requested
                if stopping:
                    if not self._connector_running():
                        break
                    # A running connector drains first (the core decides; jobs still get their GPUs at
                    # once), then the server stops; bounded in case something does not go.
                    if deadline is None:
                        self._shutting_down = True
                        deadline = self._clock() + self.config.tunnel.grace_seconds + 5.0
                    elif self._clock() >= deadline:
                        logger.warning("shutdown: the tunnel connector's drain did not finish in time")
                        break
                self.tick()
                if self._shutting_down and not self._connector_running() and not self._supervisor.poll().running:
                    break
                self._wake.wait(self._next_timeout())
        finally:
            self._shutdown()

    def tick(self) -> None:
        """One wake-up: observe, decide, act, publish."""
        self._wake.clear()
        self._apply_requests()
        now = self._clock()
        obs = self._observe(now)
        measured = self.state.cold_start_seen
        self.state, actions = decide(self.state, obs, now, self.policy)
        if self.state.cold_start_seen != measured and self.state.cold_start_seen is not None and self.profile:
            self._record_cold_start(self.profile.name, self.state.cold_start_seen)
        rerun = False
        for action in actions:
            if isinstance(action, CountConflict):
                self._metrics.job_conflict()
            elif isinstance(action, StopServer):
                self._stop_server(action)
                rerun = True
            elif isinstance(action, StartServer):
                self._start_server(action)
            elif isinstance(action, StopConnector) and self._connector is not None:
                self._connector.stop()  # SIGTERM only: never waits for the drain
            elif isinstance(action, StartConnector) and self._connector is not None:
                self._connector.start()
        self._account(now, obs)
        self._heartbeat = self._clock()
        self._publish(obs.server)
        self._answer_releases()
        if rerun:
            self.wake()  # the server is down: let the core see it right away

    def _record_cold_start(self, profile: str, seconds: float) -> None:
        """Keep the measured start-to-ready time for `replay`; a full disk costs only the record."""
        try:
            record_cold_start(self.config.state_dir, profile, seconds)
        except OSError as exc:
            logger.warning("cannot record the cold start of {}: {}", profile, exc)

    def _next_timeout(self) -> float:
        timeout = self.config.slurm.rescan_seconds
        if self.state.phase in (Phase.STARTING, Phase.BACKOFF) or self.state.cooling or self._releases:
            timeout = min(timeout, FAST_TICK)
        if self.state.phase == Phase.IDLE and self.state.free_since is not None:
            timeout = min(timeout, FAST_TICK)
        if self._connector is not None:
            if self._connector.stopping or self.state.drain_until is not None or self._shutting_down:
                timeout = min(timeout, TUNNEL_TICK)  # a drain ends: the server's stop may be waiting on it
            elif self.state.phase == Phase.SERVING and not self._tunnel.running:
                # A connector to restart once its backoff is over.
                timeout = min(timeout, max(self.state.connector_backoff_until - self._clock(), TUNNEL_TICK))
        return timeout

    def _connector_running(self) -> bool:
        return self._connector is not None and self._tunnel.running

    # --- observe ---------------------------------------------------------------------------------

    def _observe(self, now: float) -> Observation:
        dirs = self._scan_jobs()
        self._query_new_jobs([j for j in dirs if self._needs_query(j, now)], now)
        jobs: list[Job] = []
        for job_id in dirs:
            gpus = self._known.get(job_id)
            seen = (self._watcher.first_seen(job_id) if self._watcher else None) or now
            user, partition = self._job_owner.get(job_id, (None, None))
            jobs.append(Job(job_id=job_id, gpus=gpus, seen_at=seen, source=self._scan_source, user=user,
                            partition=partition))
        gone = [j for j in self._known if j not in dirs]
        for job_id in gone:
            self._known.pop(job_id, None)
            self._last_query.pop(job_id, None)
            self._job_owner.pop(job_id, None)
        if gone and self._watcher is not None:
            self._watcher.forget(gone)
        if gone:
            logger.info("job(s) ended: {}", ", ".join(gone))

        cgroup_ids = set(dirs)
        with self._lock:
            for rel in self._releases:
                rel.cgroup_seen = rel.cgroup_seen or rel.job_id in cgroup_ids
            # A prolog entry lives until its job's cgroup has come and gone (or a TTL, if it never came).
            self._releases = [
                r for r in self._releases
                if now - r.seen_at < PROLOG_TTL and not (r.cgroup_seen and r.job_id not in cgroup_ids)
            ]
            releases = list(self._releases)
        for rel in releases:
            rel.taken.set()
            jobs.append(Job(job_id=rel.job_id, gpus=rel.gpus, seen_at=rel.seen_at, source=JobSource.PROLOG))

        if self._gpu_job_processes is not None and self.state.claimed:
            try:
                found = self._gpu_job_processes(self.state.claimed)
            except Exception:
                logger.exception("reading GPU processes failed")
                found = {}
            known_ids = {j.job_id for j in jobs if j.gpus}
            for job_id, on_gpus in found.items():
                if job_id not in known_ids:
                    logger.warning("job {} has processes on our GPU(s) {}", job_id, sorted(on_gpus))
                    jobs.append(Job(job_id=job_id, gpus=frozenset(on_gpus), seen_at=now, source=JobSource.GPU_PROCESS))

        poll = self._supervisor.poll()
        crashed = bool(poll.exited) or self._start_failed is not None
        if crashed:
            code = poll.exit_code
            logger.warning("server exited on its own (exit code {}){}", code,
                           f": {self._start_failed}" if self._start_failed else "")
            self._start_failed = None
            self._health.watch(None)
        server = ServerObs(
            running=bool(poll.running), ready=bool(poll.running) and self._health.ready, pid=poll.pid,
            crashed=crashed, exit_code=poll.exit_code,
        )
        with self._lock:
            restart = self._restart_requested
            self._restart_requested = False
        self._last_jobs = tuple(jobs)
        if self._connector is not None:
            self._tunnel = self._connector.observe()
        return Observation(
            node_gpus=self.node_gpus, jobs=tuple(jobs), server=server,
            restart_requested=restart, disabled_reason=self.disabled_reason,
            tunnel=self._tunnel, shutdown=self._shutting_down,
        )

    def _needs_query(self, job_id: str, now: float) -> bool:
        if job_id not in self._known:
            return True
        # Unknown GPUs: ask again, but not on every wake-up (Slurm may be down).
        return self._known[job_id] is None and now - self._last_query.get(job_id, 0.0) >= REQUERY_SECONDS

    def _query_new_jobs(self, job_ids: list[str], now: float) -> None:
        """Ask Slurm about these jobs, in parallel: a slow Slurm costs one timeout, not one per job."""
        if not job_ids:
            return
        if len(job_ids) == 1:
            results = [self._slurm.query_job(job_ids[0])]
        else:
            results = list(self._pool.map(self._slurm.query_job, job_ids))
        answered = self._clock()
        for job_id, result in zip(job_ids, results, strict=True):
            first = job_id not in self._known
            self._last_query[job_id] = answered
            self._metrics.slurm_query(result.duration, result.error is None)
            self._known[job_id] = result.gpus
            # Fakes of the Slurm client may not say who runs the job: the labels then stay empty.
            user, partition = getattr(result, "user", None), getattr(result, "partition", None)
            if user or partition:
                self._job_owner[job_id] = (user, partition)
            if first:
                self._metrics.job_seen()
                seen = (self._watcher.first_seen(job_id) if self._watcher else None) or now
                self._metrics.detected(answered - seen)
                if result.gpus is None:
                    logger.warning("job {}: Slurm did not say which GPUs it holds ({}); treating it as holding "
                                   "all", job_id, result.error)
                else:
                    logger.info("job {} started, GPUs {}", job_id, sorted(result.gpus) or "none")
            elif result.gpus is not None:
                logger.info("job {}: Slurm answered now, GPUs {}", job_id, sorted(result.gpus) or "none")

    # --- act -------------------------------------------------------------------------------------

    def _start_server(self, action: StartServer) -> None:
        if self.profile is None:
            self._start_failed = "no profile"
            return
        try:
            launch = build_launch(self.profile, self.config, action.gpus)
        except Exception as exc:  # a profile or key-file problem: count as a failed start, back off
            self._start_failed = str(exc)
            logger.error("cannot build the server command: {}", exc)
            self.wake()
            return
        logger.info("starting {} on GPUs {}: {}", self.profile.name, list(action.gpus), " ".join(launch.argv))
        try:
            self._supervisor.start(launch.argv, launch.full_env(), gpus=action.gpus)
        except OSError as exc:
            self._start_failed = f"{launch.argv[0]}: {exc.strerror or exc}"
            logger.error("cannot start the server: {}", self._start_failed)
            self.wake()
            return
        self._launch = launch
        if self._starts:
            self._metrics.server_restarted()
        self._starts += 1
        self._health.watch(launch.health_url)

    def _stop_server(self, action: StopServer) -> None:
        self._health.watch(None)
        if self._supervisor.pid is None and not self._supervisor.poll().running:
            return
        result = self._supervisor.stop(self.config.server.stop_timeout_seconds)
        gone_at = self._clock()
        if action.reason is not None:
            latency = gone_at - action.signal_at if action.signal_at is not None else None
            self._metrics.yielded(action.reason, latency)
            logger.info("yielded GPUs {} to job(s) {} ({}) in {:.1f} ms{}", list(self.state.last_yield.gpus)
                        if self.state.last_yield else [], ", ".join(action.job_ids), action.reason.value,
                        (latency or 0) * 1000, " (needed SIGKILL)" if result.escalated else "")
        else:
            logger.info("server stopped{}", " (needed SIGKILL)" if result.escalated else "")
        if result.remaining:
            logger.error("{} process(es) of the server survived SIGKILL; will keep trying", result.remaining)

    def _answer_releases(self) -> None:
        snap_running = self._supervisor.pid is not None
        claimed = set(self.state.claimed) if snap_running else set()
        with self._lock:
            for rel in self._releases:
                if not rel.gpus & claimed:
                    rel.done.set()

    # --- requests --------------------------------------------------------------------------------

    def _apply_requests(self) -> None:
        with self._lock:
            profile, self._pending_profile = self._pending_profile, None
            config, self._pending_config = self._pending_config, None
        if config is not None:
            self._reload(config)
        if profile is not None:
            self._use_profile(profile)

    def _reload(self, config: Config) -> None:
        old = self.config
        for key, before, after in (
            ("metrics.listen", old.metrics.listen, config.metrics.listen),
            ("state_dir", old.state_dir, config.state_dir),
            ("control.socket", old.control_socket, config.control_socket),
            ("slurm.cgroup_root", old.slurm.cgroup_root, config.slurm.cgroup_root),
            ("slurm.detect", old.slurm.detect, config.slurm.detect),
            ("node.name", old.node.name, config.node.name),
            ("tunnel", old.tunnel, config.tunnel),
        ):
            if before != after:
                logger.warning("{} changed ({} -> {}): takes effect after a restart of the daemon", key, before, after)
        config = replace(
            config, metrics=old.metrics, state_dir=old.state_dir, control_socket=old.control_socket,
            slurm=replace(config.slurm, cgroup_root=old.slurm.cgroup_root, detect=old.slurm.detect), node=old.node,
            tunnel=old.tunnel, tunnel_hostname=old.tunnel_hostname,
        )
        self.config = config
        logger.info("config reloaded from {}", config.source)
        launch_changed = (old.server, old.cuda, old.claim.gpus) != (config.server, config.cuda, config.claim.gpus)
        name = config.server.profile if config.server.profile != old.server.profile else (
            self.profile.name if self.profile else config.server.profile)
        self._select_profile(name)
        if launch_changed and self._supervisor.pid is not None:
            with self._lock:
                self._restart_requested = True

    def _use_profile(self, profile: Profile) -> None:
        self.profile = profile
        self._set_disabled(None)
        self.policy = policy_from(self.config, self.node_gpus, profile)
        if self.state.phase == Phase.BACKOFF:
            self.state = replace(self.state, phase=Phase.IDLE, crashes=0, backoff_until=0.0)
        if self._supervisor.pid is not None:
            with self._lock:
                self._restart_requested = True

    def _select_profile(self, name: str | None) -> None:
        """Load the named profile; a profile that cannot run here disables serving (metrics go on)."""
        if self.config.exporter_only:
            self._set_disabled("exporter-only mode")
            return
        if not name:
            self._set_disabled("no server.profile configured")
            return
        try:
            profile = self._load_profile(name)
        except ProfileError as exc:
            self._set_disabled(str(exc))
            return
        why = check_runnable(profile, self.config, self.config.claim.gpus or self.node_gpus)
        if why:
            self._set_disabled(why)
            return
        self.profile = profile
        self.policy = policy_from(self.config, self.node_gpus, profile)
        self._set_disabled(None)

    def _set_disabled(self, reason: str | None) -> None:
        if reason and reason != self.disabled_reason:
            logger.error("not serving: {}", reason)
        self.disabled_reason = reason

    # --- bookkeeping -----------------------------------------------------------------------------

    def _account(self, now: float, obs: Observation) -> None:
        if self._last_tick is not None:
            dt = max(now - self._last_tick, 0.0)
            if self.state.phase == Phase.SERVING:
                self._harvested += len(self.state.claimed) * dt
            held: set[int] = set()
            for job in obs.jobs:
                held |= set(job.gpus) if job.gpus is not None else set(range(self.node_gpus))
            self._idle += max(self.node_gpus - len(held & set(range(self.node_gpus))), 0) * dt
        self._last_tick = now

    def _publish(self, server: ServerObs) -> None:
        snap = self._make_snapshot(server)
        with self._lock:
            self._snapshot = snap

    def _make_snapshot(self, server: ServerObs) -> Snapshot:
        last = self.state.last_yield
        offset = self._wall() - self._clock()
        pid = self._supervisor.pid if server.running or self._supervisor.pid else None
        extra = {}
        extra["stop_method"] = self._supervisor.stop_method
        guard = self._supervisor.guard_pid
        if guard is not None and pid:
            extra["guard_pid"] = str(guard)
        if self._launch is not None and pid:
            extra["server_argv"] = " ".join(self._launch.argv)
        tunnel = self._tunnel
        return Snapshot(
            tunnel_enabled=self._connector is not None,
            tunnel_state=self._tunnel_state(tunnel),
            tunnel_pid=tunnel.pid if tunnel.running else None,
            tunnel_ready=tunnel.ready,
            tunnel_url=f"https://{self.config.tunnel.hostname}" if self.config.tunnel.hostname else None,
            tunnel_restarts=self._connector.restarts if self._connector is not None else 0,
            node=self.config.node.name,
            phase=self.state.phase,
            node_gpus=self.node_gpus,
            claimed_gpus=self.state.claimed if pid or self.state.phase == Phase.STARTING else (),
            gpu_owner=gpu_owners(self.state, Observation(self.node_gpus, self._last_jobs, server), self.policy),
            jobs=self._last_jobs,
            profile=self.profile.name if self.profile else (self.config.server.profile or ""),
            model=self.profile.model if self.profile else "",
            server_pid=pid,
            server_ready=server.ready,
            server_started_at=self._supervisor.started_at if pid else None,
            last_yield_at=last.at + offset if last else None,
            last_yield_reason=last.reason.value if last else None,
            last_yield_jobs=last.job_ids if last else (),
            crashes=self.state.crashes,
            disabled_reason=self.disabled_reason,
            harvested_gpu_seconds=self._harvested,
            idle_gpu_seconds=self._idle,
            loop_heartbeat=self._heartbeat,
            extra=extra,
        )

    def _tunnel_state(self, tunnel: TunnelObs) -> str:
        if self._connector is None:
            return "disabled"
        if tunnel.stopping:
            return "draining"
        if tunnel.running:
            return "ready" if tunnel.ready else "connecting"
        if self.state.phase == Phase.SERVING and self.state.connector_crashes:
            return "backoff"
        return "stopped"

    def _shutdown(self) -> None:
        logger.info("shutting down")
        if self._watcher is not None:
            self._watcher.stop()
        self._health.watch(None)
        if self._connector is not None:
            # Whatever the loop did not finish: the connector goes before the server, always.
            self._connector.close()
            self._tunnel = TunnelObs(enabled=True)
        if self._supervisor.pid is not None or self._supervisor.poll().running:
            self._supervisor.stop(self.config.server.stop_timeout_seconds)
        self._health.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.state = replace(self.state, phase=Phase.IDLE, claimed=())
        self._publish(ServerObs())
        with self._lock:
            for rel in self._releases:
                rel.done.set()
