"""The daemon's YAML config: schema, defaults, and validation with errors that name file, key and value."""

from __future__ import annotations

import os
import re
import shlex
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ENV_CONFIG = "EXPORTER_WATCHDOG_CONFIG"
SYSTEM_CONFIG = Path("/etc/exporter-watchdog/config.yaml")
# cloudflared's own first choice when --metrics has no address, on loopback only.
DEFAULT_TUNNEL_METRICS = "127.0.0.1:20241"


class ConfigError(Exception):
    """A config problem; `str()` names the file, the key and the offending value."""

    def __init__(self, source: str, key: str, value: object, problem: str) -> None:
        self.source, self.key, self.value, self.problem = source, key, value, problem
        shown = "(missing)" if value is _MISSING else repr(value)
        super().__init__(f"{source}: {key} = {shown}: {problem}")


class _Missing:
    def __repr__(self) -> str:
        return "(missing)"


_MISSING: Any = _Missing()


def default_state_dir() -> Path:
    """Where the daemon keeps its socket, records and logs when `state_dir` is not set."""
    if os.geteuid() == 0:
        return Path("/var/lib/exporter-watchdog")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "exporter-watchdog"


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


@dataclass(frozen=True)
class NodeConfig:
    name: str
    gpus: int | None  # GPU count where NVML is not available


@dataclass(frozen=True)
class ClaimConfig:
    gpus: int | None  # None: every GPU of the node
    cooldown_seconds: float
    yield_on_any_job: bool
    start_rule: str = "always"  # always | learned (core.model.StartRule)


@dataclass(frozen=True)
class ServerConfig:
    profile: str | None
    port: int
    host: str
    models_dir: Path | None
    startup_timeout_seconds: float | None  # None: the profile's
    stop_timeout_seconds: float
    api_key_file: Path | None
    extra_args: tuple[str, ...]
    env: Mapping[str, str]
    log_max_bytes: int
    backoff_initial_seconds: float
    backoff_max_seconds: float
    cgroup: str = "auto"  # auto | off | a cgroup folder to create the servers' cgroups in
    cold_start_seconds: float | None = None  # None: the profile's, else measured at the first start


@dataclass(frozen=True)
class CudaConfig:
    home: Path | None  # a CUDA toolkit to run the server with (the seeds' CUDA_HOME_OVERRIDE)
    version: str | None  # the toolkit's version when it cannot be read from home/version.json
    library_paths: tuple[Path, ...]  # prepended to LD_LIBRARY_PATH


@dataclass(frozen=True)
class MetricsConfig:
    listen: str
    gpu_cache_seconds: float
    hpc_job_mapping_dir: Path | None = None  # dcgm-exporter's job-mapping files, for hpc_job without Slurm
    gpm_interval_seconds: float = 5.0  # GPM profiling sample interval; 0 turns GPM off


@dataclass(frozen=True)
class SlurmConfig:
    cgroup_root: Path
    scontrol: tuple[str, ...]
    timeout_seconds: float
    detect: str  # inotify | poll | squeue
    poll_interval_seconds: float
    rescan_seconds: float
    squeue: tuple[str, ...] = ("squeue",)
    squeue_interval_seconds: float = 2.0


@dataclass(frozen=True)
class TunnelConfig:
    """The Cloudflare tunnel connector the daemon runs while its server serves (see docs/tunnel.md)."""

    enabled: bool = False
    cloudflared: tuple[str, ...] = ("cloudflared",)
    token_file: Path | None = None  # a dashboard-managed tunnel: passed as --token-file, never read here
    config_file: Path | None = None  # a locally-managed tunnel: tunnel id and credentials-file
    hostname: str | None = None
    metrics: str = DEFAULT_TUNNEL_METRICS
    grace_seconds: float = 30.0
    allow_unauthenticated: bool = False


@dataclass(frozen=True)
class Config:
    source: str  # the file it came from, or "(defaults)"
    node: NodeConfig
    claim: ClaimConfig
    server: ServerConfig
    cuda: CudaConfig
    metrics: MetricsConfig
    slurm: SlurmConfig
    state_dir: Path
    control_socket: Path
    exporter_only: bool
    log_level: str
    tunnel_hostname: str | None = None
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)


# --- field checkers: each returns the converted value or raises ValueError(problem) ---------------

Check = Callable[[Any], Any]


def _int(minimum: int | None = None, maximum: int | None = None, nullable: bool = False) -> Check:
    def check(v: Any) -> Any:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError("expected an integer" + (" or null" if nullable else ""))
        if minimum is not None and v < minimum:
            raise ValueError(f"must be >= {minimum}")
        if maximum is not None and v > maximum:
            raise ValueError(f"must be <= {maximum}")
        return v

    return check


def _float(minimum: float = 0.0, nullable: bool = False, positive: bool = False) -> Check:
    def check(v: Any) -> Any:
        if v is None and nullable:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError("expected a number" + (" or null" if nullable else ""))
        if positive and v <= 0:
            raise ValueError("must be > 0")
        if v < minimum:
            raise ValueError(f"must be >= {minimum}")
        return float(v)

    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("expected true or false")
    return v


def _str(nullable: bool = False, choices: tuple[str, ...] | None = None) -> Check:
    def check(v: Any) -> Any:
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v.strip():
            raise ValueError("expected a non-empty string" + (" or null" if nullable else ""))
        if choices and v not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v

    return check


def _path(nullable: bool = True) -> Check:
    def check(v: Any) -> Any:
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v:
            raise ValueError("expected a path")
        return Path(os.path.expanduser(v))

    return check


def _listen(v: Any) -> str:
    if not isinstance(v, str) or ":" not in v:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:9400")
    host, _, port = v.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("the port must be a number from 0 to 65535")
    if not host:
        raise ValueError("expected HOST:PORT, e.g. 0.0.0.0:9400")
    return v


def _argv(v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        parts = shlex.split(v)
    elif isinstance(v, list) and all(isinstance(p, str) for p in v):
        parts = list(v)
    else:
        raise ValueError("expected a command: a string or a list of strings")
    if not parts:
        raise ValueError("the command is empty")
    return tuple(parts)


def _str_list(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(p, (str, int, float)) for p in v):
        raise ValueError("expected a list of strings")
    return tuple(str(p) for p in v)


def _path_list(v: Any) -> tuple[Path, ...]:
    return tuple(Path(os.path.expanduser(p)) for p in _str_list(v))


def _env_map(v: Any) -> dict[str, str]:
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of NAME: value")
    out = {}
    for k, val in v.items():
        if not isinstance(k, str) or not k or "=" in k:
            raise ValueError(f"bad environment variable name {k!r}")
        if not isinstance(val, (str, int, float)) or isinstance(val, bool):
            raise ValueError(f"the value of {k} must be a string or number")
        out[k] = str(val)
    return out


_HOSTNAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")


def _hostname(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not _HOSTNAME.match(v):
        raise ValueError("expected a bare host name like llm.example.org (no scheme, port or path)")
    return v


def _log_level(v: Any) -> str:
    levels = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
    if not isinstance(v, str) or v.upper() not in levels:
        raise ValueError(f"expected one of {', '.join(levels)}")
    return v.upper()


# key -> (default, checker). A default of None means "null unless set"; callables compute it.
SCHEMA: dict[str, tuple[Any, Check]] = {
    "node.name": (None, _str(nullable=True)),
    "node.gpus": (None, _int(1, 64, nullable=True)),
    "claim.gpus": (None, _int(1, 64, nullable=True)),
    "claim.cooldown_seconds": (60.0, _float()),
    "claim.yield_on_any_job": (False, _bool),
    "claim.start_rule": ("always", _str(choices=("always", "learned"))),
    "server.profile": (None, _str(nullable=True)),
    "server.port": (8000, _int(1, 65535)),
    "server.host": ("127.0.0.1", _str()),
    "server.models_dir": (None, _path()),
    "server.startup_timeout_seconds": (None, _float(nullable=True, positive=True)),
    "server.stop_timeout_seconds": (30.0, _float(positive=True)),
    "server.api_key_file": (None, _path()),
    "server.extra_args": ([], _str_list),
    "server.env": ({}, _env_map),
    "server.log_max_bytes": (50 * 2**20, _int(4096)),
    "server.backoff_initial_seconds": (5.0, _float(positive=True)),
    "server.backoff_max_seconds": (300.0, _float(positive=True)),
    "server.cgroup": ("auto", _str()),
    "server.cold_start_seconds": (None, _float(nullable=True, positive=True)),
    "cuda.home": (None, _path()),
    "cuda.version": (None, _str(nullable=True)),
    "cuda.library_paths": ([], _path_list),
    "metrics.listen": ("0.0.0.0:9400", _listen),
    "metrics.gpu_cache_seconds": (1.0, _float()),
    "metrics.hpc_job_mapping_dir": (None, _path()),
    "metrics.gpm_interval_seconds": (5.0, _float()),
    "slurm.cgroup_root": ("/sys/fs/cgroup", _path(nullable=False)),
    "slurm.scontrol": ("scontrol", _argv),
    "slurm.timeout_seconds": (2.0, _float(positive=True)),
    "slurm.detect": ("inotify", _str(choices=("inotify", "poll", "squeue"))),
    "slurm.squeue": ("squeue", _argv),
    "slurm.squeue_interval_seconds": (2.0, _float(positive=True)),
    "slurm.poll_interval_seconds": (0.25, _float(positive=True)),
    "slurm.rescan_seconds": (5.0, _float(positive=True)),
    "state_dir": (None, _path()),
    "control.socket": (None, _path()),
    "tunnel.enabled": (False, _bool),
    "tunnel.cloudflared": ("cloudflared", _argv),
    "tunnel.token_file": (None, _path()),
    "tunnel.config_file": (None, _path()),
    "tunnel.hostname": (None, _hostname),
    "tunnel.metrics": (DEFAULT_TUNNEL_METRICS, _listen),
    "tunnel.grace_seconds": (30.0, _float()),
    "tunnel.allow_unauthenticated": (False, _bool),
    "exporter_only": (False, _bool),
    "log.level": ("INFO", _log_level),
}

SECTIONS = {key.split(".")[0] for key in SCHEMA if "." in key}


def _flatten(doc: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Turn nested sections into dotted keys, rejecting unknown keys and non-mapping sections."""
    flat: dict[str, Any] = {}
    for top, value in doc.items():
        if not isinstance(top, str):
            raise ConfigError(source, str(top), top, "keys must be strings")
        if top in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ConfigError(source, top, value, "expected a mapping of settings")
            for sub, subval in value.items():
                key = f"{top}.{sub}"
                if key not in SCHEMA:
                    known = ", ".join(sorted(k for k in SCHEMA if k.startswith(top + ".")))
                    raise ConfigError(source, key, subval, f"unknown key (known in {top}: {known})")
                flat[key] = subval
        elif top in SCHEMA:
            flat[top] = value
        else:
            known = ", ".join(sorted(SECTIONS | {k for k in SCHEMA if "." not in k}))
            raise ConfigError(source, top, value, f"unknown key (known: {known})")
    return flat


def default_config_path() -> Path | None:
    """--config, else $EXPORTER_WATCHDOG_CONFIG, else /etc/exporter-watchdog/config.yaml, else ~/.config/..."""
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    user = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "exporter-watchdog/config.yaml"
    for candidate in (SYSTEM_CONFIG, user):
        if candidate.is_file():
            return candidate
    return None


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> Config:
    """Read and validate the config; `overrides` (dotted keys) apply on top, e.g. from --listen."""
    source = str(path) if path else "(defaults)"
    doc: Any = {}
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(source, "(file)", str(path), f"cannot read: {exc.strerror}") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else "(file)"
            raise ConfigError(source, where, "(yaml)", f"not valid YAML: {exc}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise ConfigError(source, "(top level)", doc, "expected a mapping of sections")
    flat = _flatten(doc, source)
    for key, value in (overrides or {}).items():
        if key not in SCHEMA:
            raise ConfigError("(command line)", key, value, "unknown key")
        flat[key] = value

    values: dict[str, Any] = {}
    for key, (default, check) in SCHEMA.items():
        if key in flat:
            where = "(command line)" if overrides and key in overrides else source
            try:
                values[key] = check(flat[key])
            except ValueError as exc:
                raise ConfigError(where, key, flat[key], str(exc)) from None
        else:
            values[key] = check(default) if default is not None else None
    return _build(values, source, doc)


def _build(v: dict[str, Any], source: str, raw: Mapping[str, Any]) -> Config:
    node_gpus, claim = v["node.gpus"], v["claim.gpus"]
    if node_gpus is not None and claim is not None and claim > node_gpus:
        raise ConfigError(source, "claim.gpus", claim, f"more than node.gpus ({node_gpus})")
    if v["server.backoff_max_seconds"] < v["server.backoff_initial_seconds"]:
        raise ConfigError(
            source, "server.backoff_max_seconds", v["server.backoff_max_seconds"],
            "must be >= server.backoff_initial_seconds",
        )
    tunnel = _tunnel(v, source)
    state_dir = v["state_dir"] or default_state_dir()
    control_socket = v["control.socket"] or state_dir / "control.sock"
    if len(str(control_socket)) > 100:
        raise ConfigError(source, "control.socket", str(control_socket), "a Unix socket path must be short")
    return Config(
        source=source,
        node=NodeConfig(name=v["node.name"] or short_hostname(), gpus=node_gpus),
        claim=ClaimConfig(gpus=claim, cooldown_seconds=v["claim.cooldown_seconds"],
                          yield_on_any_job=v["claim.yield_on_any_job"], start_rule=v["claim.start_rule"]),
        server=ServerConfig(
            profile=v["server.profile"], port=v["server.port"], host=v["server.host"],
            models_dir=v["server.models_dir"], startup_timeout_seconds=v["server.startup_timeout_seconds"],
            stop_timeout_seconds=v["server.stop_timeout_seconds"], api_key_file=v["server.api_key_file"],
            extra_args=v["server.extra_args"], env=v["server.env"], log_max_bytes=v["server.log_max_bytes"],
            backoff_initial_seconds=v["server.backoff_initial_seconds"],
            backoff_max_seconds=v["server.backoff_max_seconds"], cgroup=v["server.cgroup"],
            cold_start_seconds=v["server.cold_start_seconds"],
        ),
        cuda=CudaConfig(home=v["cuda.home"], version=v["cuda.version"], library_paths=v["cuda.library_paths"]),
        metrics=MetricsConfig(listen=v["metrics.listen"], gpu_cache_seconds=v["metrics.gpu_cache_seconds"],
                              hpc_job_mapping_dir=v["metrics.hpc_job_mapping_dir"],
                              gpm_interval_seconds=v["metrics.gpm_interval_seconds"]),
        slurm=SlurmConfig(
            cgroup_root=v["slurm.cgroup_root"], scontrol=v["slurm.scontrol"],
            timeout_seconds=v["slurm.timeout_seconds"], detect=v["slurm.detect"],
            poll_interval_seconds=v["slurm.poll_interval_seconds"], rescan_seconds=v["slurm.rescan_seconds"],
            squeue=v["slurm.squeue"], squeue_interval_seconds=v["slurm.squeue_interval_seconds"],
        ),
        state_dir=state_dir,
        control_socket=control_socket,
        exporter_only=v["exporter_only"],
        log_level=v["log.level"],
        tunnel_hostname=v["tunnel.hostname"],
        tunnel=tunnel,
        raw=raw,
    )


def _tunnel(v: dict[str, Any], source: str) -> TunnelConfig:
    """The tunnel section; with enabled: true it must say how to reach Cloudflare, and the API needs a key."""
    tunnel = TunnelConfig(
        enabled=v["tunnel.enabled"], cloudflared=v["tunnel.cloudflared"], token_file=v["tunnel.token_file"],
        config_file=v["tunnel.config_file"], hostname=v["tunnel.hostname"], metrics=v["tunnel.metrics"],
        grace_seconds=v["tunnel.grace_seconds"], allow_unauthenticated=v["tunnel.allow_unauthenticated"],
    )
    if not tunnel.enabled:
        return tunnel
    if tunnel.token_file is not None and tunnel.config_file is not None:
        raise ConfigError(source, "tunnel.config_file", str(tunnel.config_file),
                          "set tunnel.token_file (dashboard-managed tunnel) or tunnel.config_file "
                          "(locally-managed tunnel), not both")
    if tunnel.token_file is None and tunnel.config_file is None:
        raise ConfigError(source, "tunnel.token_file", None,
                          "tunnel.enabled is true: set tunnel.token_file (dashboard-managed tunnel) or "
                          "tunnel.config_file (locally-managed tunnel)")
    if tunnel.config_file is not None and tunnel.hostname is None:
        raise ConfigError(source, "tunnel.hostname", None,
                          "a locally-managed tunnel (tunnel.config_file) needs the public hostname for its ingress")
    port = int(tunnel.metrics.rpartition(":")[2])
    if port == 0:
        raise ConfigError(source, "tunnel.metrics", tunnel.metrics,
                          "needs a fixed port: the daemon reads the connector's /ready there")
    if v["server.api_key_file"] is None and not tunnel.allow_unauthenticated:
        raise ConfigError(source, "tunnel.enabled", True,
                          "publishes the server's API, but server.api_key_file is not set: set "
                          "server.api_key_file (vLLM then requires the key on /v1/*), or "
                          "tunnel.allow_unauthenticated: true to publish it without a key")
    return tunnel
