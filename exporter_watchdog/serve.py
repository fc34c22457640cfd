"""`exporter-watchdog serve`: build the real (or demo) pieces in one place and run the daemon loop."""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from loguru import logger
from prometheus_client import CollectorRegistry

from exporter_watchdog.act.cgroup import CgroupParent, find_parent, parent_at
from exporter_watchdog.act.control import Answer, ControlError, ControlServer
from exporter_watchdog.act.health import HealthProbe
from exporter_watchdog.act.procs import list_processes, live_members
from exporter_watchdog.act.procs import read_cgroup as read_proc_cgroup
from exporter_watchdog.act.statefile import active_profile, ensure_state_dir
from exporter_watchdog.act.supervisor import RECORD_NAME, Supervisor
from exporter_watchdog.act.tunnel.connector import KILL_AFTER_GRACE, Connector
from exporter_watchdog.act.tunnel.launch import build_connector, check_files
from exporter_watchdog.config import Config, ConfigError, load_config
from exporter_watchdog.core.model import JobSource
from exporter_watchdog.daemon import Daemon
from exporter_watchdog.detect.cgroups import scan_jobs
from exporter_watchdog.detect.runner import CommandRunner, run_command
from exporter_watchdog.detect.scontrol import SlurmClient
from exporter_watchdog.detect.squeue import SqueueJobs
from exporter_watchdog.detect.watcher import CgroupWatcher
from exporter_watchdog.metrics.connections import LoopFirst
from exporter_watchdog.metrics.daemon import DaemonMetrics, SnapshotCollector, snapshot_owners
from exporter_watchdog.metrics.exposition import Guarded
from exporter_watchdog.metrics.gpm import GpmSampler
from exporter_watchdog.metrics.gpu import GpuCollector, XidWatcher
from exporter_watchdog.metrics.http import MetricsServer
from exporter_watchdog.metrics.jobs import JobInfoCollector, JobMap
from exporter_watchdog.metrics.nvml import GpuBackend, GpuUnavailable, NvmlBackend
from exporter_watchdog.metrics.ownership import CgroupReader, slurm_job_processes_on
from exporter_watchdog.profiles import ProfileError, check_runnable, find_profile, models_dir
from exporter_watchdog.status import status_dict

# /healthz turns 503 when the loop has not come round for this long (it wakes at least every rescan).
STUCK_AFTER_MIN = 30.0
# How long /metrics workers hold back after a job event: the loop detects, decides and signals in this time.
JOB_EVENT_HOLD = 0.2
SWITCH_INTERVAL = 0.001
# Scrapes this close together, with no loop iteration between them, share one /metrics rendering.
SHARED_RENDER_SECONDS = 0.25
# The connector's output goes to <state_dir>/tunnel.log, rotated to tunnel.log.1 at this size.
TUNNEL_LOG_MAX_BYTES = 10 * 2**20
DEMO_DEFAULTS: dict[str, Any] = {
    "node.name": "demo-node", "node.gpus": 4, "claim.gpus": 2, "claim.cooldown_seconds": 5.0,
    "server.profile": "demo", "server.startup_timeout_seconds": 30.0,
}


class StartupError(Exception):
    """Something outside the config keeps the daemon from starting (port taken, daemon running)."""


def configure_logging(level: str) -> None:
    logger.remove()
    logger.add(sys.stderr, level=level, format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}")


def load_serve_config(path: Path | None, *, demo: bool, listen: str | None, exporter_only: bool) -> Config:
    """The config with command-line overrides; --demo fills in a simulated node where the file is silent."""
    overrides: dict[str, Any] = {}
    if listen:
        overrides["metrics.listen"] = listen
    if exporter_only:
        overrides["exporter_only"] = True
    config = load_config(path, overrides)
    if demo:
        raw = config.raw
        silent = {k: v for k, v in DEMO_DEFAULTS.items()
                  if not isinstance(raw.get(k.split(".")[0]), dict) or k.split(".")[1] not in raw[k.split(".")[0]]}
        if silent:
            config = load_config(path, {**silent, **overrides})
    return config


@dataclass
class LateDaemon:
    """Lets pieces built before the daemon (the simulated GPUs) read its snapshot once it exists."""

    daemon: Daemon | None = None

    def server_on(self, gpu: int) -> list[tuple[int, int]]:
        """The demo server's process on the GPUs it claimed, as NVML would list it (20 GiB each)."""
        if self.daemon is None:
            return []
        snap = self.daemon.snapshot()
        if snap.server_pid and gpu in snap.claimed_gpus:
            return [(snap.server_pid, 20 << 30)]
        return []

    def processes_on(self, gpu: int) -> list[tuple[int, int]]:
        """The server's process, and one simulated process (6 GiB) of each demo job that holds the GPU."""
        from exporter_watchdog.demo.node import job_pid

        procs = self.server_on(gpu)
        if self.daemon is not None:
            procs += [(job_pid(j.job_id), 6 << 30) for j in self.daemon.snapshot().jobs
                      if j.gpus and gpu in j.gpus and j.job_id.isdigit()]
        return procs


@dataclass
class Node:
    """The node-specific pieces: real Slurm and NVML, or the demo's stand-ins."""

    gpus: int
    cgroup_root: Path
    runner: CommandRunner
    backend: GpuBackend | None
    closers: list[Any] = field(default_factory=list)
    read_cgroup: CgroupReader = read_proc_cgroup  # /proc/PID/cgroup, or the demo's for its simulated jobs


def real_node(config: Config) -> Node:
    try:
        backend: GpuBackend | None = NvmlBackend.open()
    except GpuUnavailable as exc:
        backend = None
        logger.warning("no GPU metrics: {}", exc)
    count = backend.device_count() if backend is not None else None
    if count is None or count == 0:
        if config.node.gpus is None and config.exporter_only:
            return Node(gpus=0, cgroup_root=config.slurm.cgroup_root, runner=run_command, backend=backend)
        if config.node.gpus is None:
            raise ConfigError(config.source, "node.gpus", None,
                              "NVML sees no GPU here; set node.gpus to the node's GPU count")
        count = config.node.gpus
    elif config.node.gpus is not None and config.node.gpus != count:
        logger.warning("node.gpus is {} but NVML sees {} GPUs; using NVML's count", config.node.gpus, count)
    return Node(gpus=count, cgroup_root=config.slurm.cgroup_root, runner=run_command, backend=backend)


def simulated_gpus_node(config: Config, late: LateDaemon) -> Node:
    """Real Slurm, simulated GPU metrics (no NVML): for trying a deployment on machines without GPUs."""
    from exporter_watchdog.demo.gpus import SimulatedGpus, StubLoad

    if config.node.gpus is None:
        raise ConfigError(config.source, "node.gpus", None, "--simulated-gpus needs the node's GPU count")
    load = StubLoad(f"http://127.0.0.1:{config.server.port}/metrics")
    backend = SimulatedGpus(config.node.gpus, load=load, processes=late.server_on)
    logger.warning("GPU metrics are simulated ({} GPUs): --simulated-gpus is for machines without GPUs",
                   config.node.gpus)
    return Node(gpus=config.node.gpus, cgroup_root=config.slurm.cgroup_root, runner=run_command, backend=backend)


def demo_node(config: Config, late: LateDaemon) -> Node:
    from exporter_watchdog.demo.faults import FaultSwitch
    from exporter_watchdog.demo.gpus import SimulatedGpus, StubLoad
    from exporter_watchdog.demo.node import DemoNode, DemoReaper

    gpus = config.node.gpus or 4
    node = DemoNode(config.state_dir / "demo-node", config.node.name, gpus)
    node.prepare()  # jobs a killed daemon left running stay, as on a real node
    reaper = DemoReaper(node)
    reaper.start()
    load = StubLoad(f"http://127.0.0.1:{config.server.port}/metrics")
    backend = SimulatedGpus(gpus, load=load, processes=late.processes_on)
    faults = FaultSwitch(node.root, backend).start()  # `demo fault nvml` makes NVML fail
    logger.info("demo node {} with {} simulated GPUs; job cgroups under {}", config.node.name, gpus, node.cgroup_root)

    def read_cgroup(pid: int) -> list[str] | None:
        return node.read_cgroup(pid) or read_proc_cgroup(pid)

    return Node(gpus=gpus, cgroup_root=node.cgroup_root, runner=node.scontrol, backend=backend,
                closers=[reaper.stop, node.clear, faults.stop], read_cgroup=read_cgroup)


def server_cgroup_parent(config: Config) -> CgroupParent | None:
    """Where servers get their own cgroup (server.cgroup); a configured folder that cannot be used exits 2."""
    setting = config.server.cgroup
    if setting == "off":
        return None
    if setting == "auto":
        return find_parent()
    try:
        return parent_at(Path(setting))
    except ValueError as exc:
        raise ConfigError(config.source, "server.cgroup", setting, str(exc)) from None


def check_profile_or_fail(config: Config, node_gpus: int) -> None:
    """An unknown or unrunnable configured profile is a config error: exit 2, nothing started."""
    if config.exporter_only:
        return
    claim = config.claim.gpus or node_gpus
    if claim > node_gpus:
        raise ConfigError(config.source, "claim.gpus", config.claim.gpus, f"the node has only {node_gpus} GPUs")
    name = active_profile(config.state_dir, config.server.profile)
    if name is None:
        raise ConfigError(config.source, "server.profile", None,
                          "set a model profile (see `exporter-watchdog models`), or exporter_only: true")
    try:
        profile = find_profile(models_dir(config), name)
    except ProfileError as exc:
        raise ConfigError(config.source, "server.profile", name, str(exc)) from None
    why = check_runnable(profile, config, claim)
    if why:
        raise ConfigError(config.source, "server.profile", name, why)


def serve(config_path: Path | None, *, demo: bool, listen: str | None, exporter_only: bool,
          simulated_gpus: bool = False, node_factory: Callable[[Config], Node] | None = None) -> int:
    """Run the daemon; `node_factory` builds the node's hardware side in place of NVML (a test's fake GPUs)."""
    config = load_serve_config(config_path, demo=demo, listen=listen, exporter_only=exporter_only)
    if demo and config.slurm.detect == "squeue":
        raise ConfigError(config.source, "slurm.detect", "squeue", "the demo node has no squeue; use inotify or poll")
    configure_logging(config.log_level)
    # Threads hand the interpreter lock over every 1 ms instead of 5: a job event's thread waits less
    # behind a busy /metrics worker (benchmarks/metrics_load.py).
    sys.setswitchinterval(SWITCH_INTERVAL)
    ensure_state_dir(config.state_dir)
    late = LateDaemon()
    if node_factory is not None:
        node = node_factory(config)
    elif demo:
        node = demo_node(config, late)
    elif simulated_gpus:
        node = simulated_gpus_node(config, late)
    else:
        node = real_node(config)
    try:
        if demo:
            config = replace(config, slurm=replace(config.slurm, cgroup_root=node.cgroup_root))
        check_profile_or_fail(config, node.gpus)
        if not config.exporter_only:
            check_files(config)  # the tunnel's token or config file: exit 2 before anything starts
        return _run(config, config_path, node, late, demo=demo, listen=listen, exporter_only=exporter_only)
    finally:
        for close in reversed(node.closers):
            close()
        if node.backend is not None:
            node.backend.close()


def _run(config: Config, config_path: Path | None, node: Node, late: LateDaemon, *, demo: bool, listen: str | None,
         exporter_only: bool) -> int:
    registry = CollectorRegistry()
    metrics = DaemonMetrics(registry)
    supervisor = Supervisor(
        record_path=config.state_dir / RECORD_NAME, log_path=config.state_dir / "server.log",
        term_timeout=config.server.stop_timeout_seconds, log_max_bytes=config.server.log_max_bytes,
        cgroup_parent=None if config.exporter_only else server_cgroup_parent(config),
    )
    logger.info("servers are stopped by {}; a guard process stops a server within 1 s if this daemon dies",
                supervisor.stop_method)
    # The tunnel connector: a second supervisor with its own record, log and marker variable.
    tunnel_supervisor = Supervisor(
        record_path=config.state_dir / "tunnel.json", log_path=config.state_dir / "tunnel.log",
        term_timeout=config.tunnel.grace_seconds + KILL_AFTER_GRACE, log_max_bytes=TUNNEL_LOG_MAX_BYTES,
        marker_env="EXPORTER_WATCHDOG_TUNNEL", name="tunnel connector",
    )
    connector = None
    if config.tunnel.enabled and not config.exporter_only:
        connector = Connector(
            lambda: build_connector(config, config.state_dir), tunnel_supervisor,
            HealthProbe(lambda: daemon.wake(), interval=1.0, timeout=2.0, name="tunnel connector"),
            grace_seconds=config.tunnel.grace_seconds,
        )
    slurm = SlurmClient(config.slurm.scontrol, config.node.name, node.runner, timeout=config.slurm.timeout_seconds)
    loop_first = LoopFirst()

    def job_event() -> None:
        """A job came or went: /metrics workers hold back while the loop acts on it (a yield first)."""
        loop_first.hold_for(JOB_EVENT_HOLD)
        daemon.wake()

    # Exporter-only: no server, so no Slurm either; GPU owners come from NVML's process list.
    lister: SqueueJobs | None = None
    watcher: CgroupWatcher | SqueueJobs | None = None
    if not config.exporter_only and config.slurm.detect == "squeue":
        # No job cgroups on this node: squeue lists its jobs, and answers for itself while it cannot.
        watcher = lister = SqueueJobs(
            config.slurm.squeue, config.node.name, node.runner, slurm, wake=job_event,
            interval=config.slurm.squeue_interval_seconds, timeout=config.slurm.timeout_seconds,
        )
    elif not config.exporter_only:
        watcher = CgroupWatcher(
            config.slurm.cgroup_root, config.node.name, wake=job_event, mode=config.slurm.detect,
            poll_interval=config.slurm.poll_interval_seconds, replan_interval=config.slurm.rescan_seconds,
        )
    backend = node.backend
    gpu_jobs = None
    if backend is not None and not demo:
        def gpu_jobs(claimed: tuple[int, ...]) -> dict[str, set[int]]:
            return slurm_job_processes_on(backend, claimed)
    daemon = Daemon(
        config, node_gpus=node.gpus,
        scan_jobs=(lambda: {}) if config.exporter_only else lister.jobs if lister is not None else (
            lambda: scan_jobs(config.slurm.cgroup_root, config.node.name)),
        slurm=lister or slurm, watcher=watcher, supervisor=supervisor,
        scan_source=JobSource.SQUEUE if lister is not None else JobSource.CGROUP,
        health_factory=lambda wake: HealthProbe(wake, interval=1.0, timeout=2.0),
        metrics=metrics, gpu_job_processes=gpu_jobs, connector=connector,
    )

    def server_pids() -> set[int]:
        pid = daemon.snapshot().server_pid
        return {p.pid for p in live_members(pid, list_processes())} if pid else set()

    registry.register(Guarded(SnapshotCollector(daemon.snapshot), "snapshot"))
    late.daemon = daemon
    # hpc_job: the daemon's own job->GPU map (not in exporter-only mode: no Slurm there), and the
    # site's mapping files where configured.
    mapping_dir = config.metrics.hpc_job_mapping_dir
    if mapping_dir is not None and not mapping_dir.is_dir():
        logger.warning("metrics.hpc_job_mapping_dir {} does not exist (yet); hpc_job from it once it does", mapping_dir)
    jobs = JobMap(None if config.exporter_only else daemon.snapshot, mapping_dir)
    registry.register(Guarded(JobInfoCollector(jobs), "job_info"))
    xids: XidWatcher | None = None
    gpm: GpmSampler | None = None
    if backend is not None:
        xids = XidWatcher(backend).start()
        if config.metrics.gpm_interval_seconds > 0:
            gpm = GpmSampler(backend, config.metrics.gpm_interval_seconds).start()
    # Registered with or without NVML: ownership and the node's GPUs (as down) come from the daemon.
    registry.register(GpuCollector(
        backend, config.node.name,
        owners=None if config.exporter_only else snapshot_owners(daemon.snapshot),
        server_pids=server_pids, cache_seconds=config.metrics.gpu_cache_seconds, xids=xids,
        read_cgroup=node.read_cgroup, node_gpus=node.gpus, jobs=jobs, gpm=gpm,
    ))
    stuck_after = max(STUCK_AFTER_MIN, 3 * config.slurm.rescan_seconds + 2 * config.server.stop_timeout_seconds)
    http = MetricsServer(
        config.metrics.listen, registry,
        status=lambda: status_dict(daemon.snapshot(), time.time()),
        healthy=lambda: daemon.loop_alive(stuck_after), loop_first=loop_first,
        render_key=daemon.snapshot, render_max_age=SHARED_RENDER_SECONDS,
    )
    try:
        http.start()
    except OSError as exc:
        raise StartupError(f"metrics.listen {config.metrics.listen}: {exc.strerror or exc}") from None
    control = ControlServer(config.control_socket, lambda req: handle_control(daemon, req))
    try:
        control.start()
    except (ControlError, OSError) as exc:
        http.stop()
        raise StartupError(f"control socket: {exc}") from None
    found = tunnel_supervisor.cleanup_orphan()
    if found:
        logger.warning("stopped {} process(es) of a tunnel connector left behind by an earlier daemon", found)
    found = supervisor.cleanup_orphan()
    if found:
        logger.warning("stopped {} process(es) of a server left behind by an earlier daemon", found)

    def on_stop(signum: int, frame: FrameType | None) -> None:
        logger.info("{} received", signal.Signals(signum).name)
        daemon.request_stop()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        try:
            new = load_serve_config(config_path, demo=demo, listen=listen, exporter_only=exporter_only)
        except ConfigError as exc:
            logger.error("SIGHUP: config not reloaded: {}", exc)
            return
        if demo:
            new = replace(new, slurm=replace(new.slurm, cgroup_root=node.cgroup_root))
        daemon.request_reload(new)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    logger.info("exporter-watchdog on node {} ({} GPUs), metrics on http://{}/metrics, control {}",
                config.node.name, node.gpus, config.metrics.listen, config.control_socket)
    try:
        daemon.start(active_profile(config.state_dir, config.server.profile))
        daemon.run()
    finally:
        control.stop()
        http.stop()
        if xids is not None:
            xids.stop()
        if gpm is not None:
            gpm.stop()
    logger.info("stopped")
    return 0


def handle_control(daemon: Daemon, req: dict[str, Any]) -> Answer:
    """The control socket's verbs."""
    cmd = req.get("cmd")
    if cmd == "status":
        return {"ok": True, "status": status_dict(daemon.snapshot(), time.time())}
    if cmd == "switch":
        name = req.get("profile")
        if not isinstance(name, str):
            return {"ok": False, "error": "switch needs a profile name"}
        return daemon.request_switch(name)
    if cmd == "release":
        gpus = req.get("gpus")
        timeout = req.get("timeout", 30.0)
        if not isinstance(gpus, list) or not all(isinstance(g, int) for g in gpus):
            return {"ok": False, "error": "release needs gpus: a list of GPU indices"}
        if not isinstance(timeout, (int, float)) or timeout < 0:
            return {"ok": False, "error": "release: timeout must be a number of seconds"}
        return release_answers(daemon, str(req.get("job_id", "prolog")), gpus, float(timeout))
    return {"ok": False, "error": f"unknown command {cmd!r}"}


def release_answers(daemon: Daemon, job_id: str, gpus: list[int], timeout: float) -> Iterator[dict[str, Any]]:
    """A Prolog's release: `accepted` once the loop has taken it, then the result once our server is gone."""
    started = time.monotonic()
    ticket = daemon.submit_release(job_id, gpus)
    if ticket is None:
        yield {"ok": True, "released": False, "waited": 0.0}
        return
    if ticket.taken.wait(timeout):
        yield {"ok": True, "accepted": True}
    yield daemon.await_release(ticket, started, timeout)
