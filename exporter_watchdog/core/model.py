"""Plain values that flow between detection, the decision core, the actors and the metrics."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class Phase(str, enum.Enum):
    """What the daemon is doing with its GPUs; the exported `exporter_watchdog_state{state}` values."""

    IDLE = "idle"  # no server; waiting for enough free GPUs (and the cool-down)
    STARTING = "starting"  # server spawned, /health not yet 200
    SERVING = "serving"  # server ready
    YIELDING = "yielding"  # stopping the server because a job needs its GPUs
    BACKOFF = "backoff"  # server crashed; waiting before the next start
    DISABLED = "disabled"  # never starts a server (exporter-only, or the profile cannot run here)


ALL_PHASES: tuple[Phase, ...] = tuple(Phase)


class Owner(str, enum.Enum):
    """Who holds a GPU; the `owner` label of `exporter_watchdog_gpu_owner`."""

    FREE = "free"
    WATCHDOG = "watchdog"
    SLURM = "slurm"


class YieldReason(str, enum.Enum):
    """Why the server was stopped to hand GPUs back; the `reason` label of yields_total."""

    JOB = "job"  # a job's GPUs overlap ours
    SLURM_UNKNOWN = "slurm_unknown"  # Slurm did not say which GPUs a new job holds: fail safe
    ANY_JOB = "any_job"  # claim.yield_on_any_job and a job (even CPU-only) runs
    PROLOG = "prolog"  # the job's Prolog asked for the GPUs before its tasks start
    GPU_PROCESS = "gpu_process"  # a Slurm job's process showed up on one of our GPUs


class StartRule(str, enum.Enum):
    """When an IDLE node with enough free GPUs starts the server (`claim.start_rule`)."""

    ALWAYS = "always"  # as soon as the GPUs are free (after the cool-down that follows a yield)
    LEARNED = "learned"  # wait until the node's recent gaps say this one will outlast the cold start


class JobSource(str, enum.Enum):
    """Which signal told us about a job."""

    CGROUP = "cgroup"
    SQUEUE = "squeue"  # listed by `squeue -w NODE` (nodes without job cgroups)
    PROLOG = "prolog"
    GPU_PROCESS = "gpu_process"


@dataclass(frozen=True)
class Job:
    """A Slurm job running (or about to run) on this node, as far as detection knows."""

    job_id: str
    # GPU indices the job holds on this node; None = unknown (Slurm did not answer in time), which
    # the core treats as holding every GPU. An empty set is a CPU-only job.
    gpus: frozenset[int] | None
    seen_at: float  # monotonic time of the first signal (cgroup event, prolog request, GPU process)
    source: JobSource = JobSource.CGROUP
    user: str | None = None  # from Slurm's answer, for exporter_watchdog_gpu_job_info
    partition: str | None = None


@dataclass(frozen=True)
class ServerObs:
    """The server process as the supervisor sees it right now."""

    running: bool = False  # some process of the server's group is alive
    ready: bool = False  # the last health probe answered 200
    pid: int | None = None
    crashed: bool = False  # the server exited without us asking since the last observation
    exit_code: int | None = None


@dataclass(frozen=True)
class TunnelObs:
    """The tunnel connector as its supervisor sees it right now."""

    enabled: bool = False  # the daemon runs a connector at all (tunnel.enabled)
    running: bool = False  # some process of the connector's group is alive (draining included)
    ready: bool = False  # its /ready answered 200: an edge connection is registered
    stopping: bool = False  # SIGTERM sent: it has unregistered and drains until it exits (or is killed)
    crashed: bool = False  # it exited (or failed to start) without being asked since the last observation
    pid: int | None = None


@dataclass(frozen=True)
class Observation:
    """Everything the core may look at: the world re-read after each wake-up."""

    node_gpus: int
    jobs: tuple[Job, ...]
    server: ServerObs
    restart_requested: bool = False  # `switch` asked for the server to come back on another profile
    disabled_reason: str | None = None  # set when no server may run at all (exporter-only, bad profile)
    tunnel: TunnelObs = TunnelObs()
    shutdown: bool = False  # the daemon is stopping: drain the connector, then stop the server


@dataclass(frozen=True)
class Policy:
    """The knobs of the decision core, from the config."""

    claim_gpus: int
    cooldown_seconds: float = 60.0
    yield_on_any_job: bool = False
    startup_timeout_seconds: float = 900.0
    backoff_initial_seconds: float = 5.0
    backoff_max_seconds: float = 300.0
    stable_after_seconds: float = 120.0  # serving this long forgives earlier crashes
    start_rule: StartRule = StartRule.ALWAYS
    cold_start_seconds: float = 0.0  # expected start-to-ready time until one is measured (learned rule)
    learn_gaps: int = 20  # how many recent free gaps the learned rule remembers
    tunnel_grace_seconds: float = 30.0  # how long a connector drains before the server stops (no job waiting)
    connector_backoff_initial_seconds: float = 1.0
    connector_backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class YieldRecord:
    """The last time we handed GPUs back."""

    at: float  # monotonic
    reason: YieldReason
    job_ids: tuple[str, ...]
    gpus: tuple[int, ...]  # the GPUs we held


@dataclass(frozen=True)
class State:
    """The decision core's memory between two decisions."""

    phase: Phase = Phase.IDLE
    claimed: tuple[int, ...] = ()
    phase_since: float = 0.0
    free_since: float | None = None  # since when enough GPUs have been free (cool-down clock)
    crashes: int = 0  # consecutive crashes, for the backoff
    backoff_until: float = 0.0
    conflicted_jobs: frozenset[str] = frozenset()  # jobs already counted as conflicts
    last_yield: YieldRecord | None = None
    ever_started: bool = False
    cooling: bool = False  # a yield happened: wait cooldown_seconds of free GPUs before the next start
    gap_since: float | None = None  # since when enough GPUs are free in this gap (ended by a job)
    recent_gaps: tuple[float, ...] = ()  # lengths of the last policy.learn_gaps gaps, oldest first
    cold_start_seen: float | None = None  # the last measured start-to-ready time
    connector_crashes: int = 0  # consecutive connector exits, for its own backoff
    connector_backoff_until: float = 0.0
    connector_since: float | None = None  # when the current connector was started
    drain_until: float | None = None  # a restart or shutdown waits for the connector's drain until then


# --- actions the core asks for -------------------------------------------------------------------


@dataclass(frozen=True)
class StartServer:
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class StopServer:
    """Stop the server's whole process group; `reason` None means not a yield (switch, startup timeout)."""

    reason: YieldReason | None
    job_ids: tuple[str, ...] = ()
    signal_at: float | None = None  # monotonic time of the earliest job signal, for yield latency


@dataclass(frozen=True)
class CountConflict:
    """A job landed on GPUs we held (counted once per job)."""

    job_id: str


@dataclass(frozen=True)
class StartConnector:
    """Start the tunnel connector: the server is ready."""


@dataclass(frozen=True)
class StopConnector:
    """SIGTERM the connector (it unregisters at once, then drains); the caller never waits for the drain.

    `drain` says whether the server's stop waits for it (switch, reload, shutdown) or not (a yield).
    """

    drain: bool


Action = StartServer | StopServer | CountConflict | StartConnector | StopConnector


@dataclass(frozen=True)
class Snapshot:
    """What /metrics, /status and `status` read: an immutable copy published by the daemon loop."""

    node: str
    phase: Phase
    node_gpus: int
    claimed_gpus: tuple[int, ...]
    gpu_owner: dict[int, Owner]
    jobs: tuple[Job, ...]
    profile: str
    model: str
    server_pid: int | None = None
    server_ready: bool = False
    server_started_at: float | None = None  # wall-clock time the current server was spawned
    last_yield_at: float | None = None  # wall-clock time of the last yield
    last_yield_reason: str | None = None
    last_yield_jobs: tuple[str, ...] = ()
    crashes: int = 0
    disabled_reason: str | None = None
    harvested_gpu_seconds: float = 0.0  # claimed GPUs x serving time
    idle_gpu_seconds: float = 0.0  # GPUs no job held x time
    loop_heartbeat: float = 0.0  # monotonic time the loop last finished an iteration
    extra: dict[str, str] = field(default_factory=dict)
    tunnel_enabled: bool = False
    tunnel_state: str = "disabled"  # disabled, stopped, starting, ready, draining, backoff
    tunnel_pid: int | None = None
    tunnel_ready: bool = False
    tunnel_url: str | None = None  # https://<tunnel.hostname>
    tunnel_restarts: int = 0  # connector starts after it exited on its own
