"""A pod's settings from its environment alone, validated; every error names the variable.

Pure: the environment, the host name, the resolver and the GPU count come in as arguments.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROLES = ("head", "worker")
DEFAULT_CLUSTER = "gpu-watchdog"
MIN_KEY_BYTES = 32  # munged refuses shorter keys
# Environment variables that hold secrets: consumed by `pod render`, then removed from the
# environment before any daemon starts.
SECRET_VARS = ("MUNGE_KEY", "EW_API_KEY")
RUNPOD_INTERNAL = "runpod.internal"

_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_CLUSTER = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_PROFILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class PodError(Exception):
    """A bad or missing environment variable; str() names it (never its value when it is a secret)."""

    def __init__(self, var: str, problem: str) -> None:
        self.var = var
        super().__init__(f"{var}: {problem}")


@dataclass(frozen=True)
class Worker:
    """One entry of WORKER_NODES."""

    name: str
    addr: str | None


@dataclass(frozen=True)
class PodSettings:
    role: str
    cluster: str
    node_name: str
    node_addr: str
    hostname: str  # the container's host name: slurmctld runs only where SlurmctldHost names it
    head_host: str | None  # workers: where slurmctld listens
    workers: tuple[Worker, ...]
    gpus: int
    munge_key: bytes
    api_key: str | None
    profile: str | None
    claim_gpus: int | None
    cooldown_seconds: float
    server_port: int
    metrics_port: int
    squeue_interval_seconds: float
    max_nodes: int
    partition: str
    root: Path  # prefix for /etc and /var when run outside a container
    gpu_device_dir: str  # where the nvidiaN devices are; %n stands for the node name
    simulated_gpus: bool
    head_wait_seconds: float

    def path(self, absolute: str) -> Path:
        """An absolute path of the image, under the root override."""
        return self.root / absolute.lstrip("/")


def _get(env: Mapping[str, str], var: str) -> str | None:
    value = env.get(var, "").strip()
    return value or None


def _int(env: Mapping[str, str], var: str, default: int | None, low: int, high: int) -> int | None:
    raw = _get(env, var)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise PodError(var, f"{raw!r} is not a whole number from {low} to {high}")
    return int(raw)


def _float(env: Mapping[str, str], var: str, default: float) -> float:
    raw = _get(env, var)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise PodError(var, f"{raw!r} is not a positive number of seconds")
    return value


def _flag(env: Mapping[str, str], var: str) -> bool:
    raw = (_get(env, var) or "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no"):
        raise PodError(var, f"{raw!r} is not 1 or 0")
    return raw in ("1", "true", "yes")


def decode_key(env: Mapping[str, str], var: str = "MUNGE_KEY") -> bytes:
    """The cluster key: base64 of at least 32 bytes. Errors never show the value."""
    raw = _get(env, var)
    if raw is None:
        raise PodError(var, "missing: set it from a RunPod secret, e.g. "
                            f"{var}={{{{ RUNPOD_SECRET_munge_key }}}} (base64 of >= {MIN_KEY_BYTES} random bytes: "
                            "openssl rand -base64 48)")
    try:
        key = base64.b64decode("".join(raw.split()), validate=True)
    except (binascii.Error, ValueError):
        raise PodError(var, "not valid base64 (value not shown)") from None
    if len(key) < MIN_KEY_BYTES:
        raise PodError(var, f"too short: {len(key)} bytes after base64 decoding, at least {MIN_KEY_BYTES} needed")
    return key


def node_name_from(env: Mapping[str, str], hostname: str) -> str:
    """NODE_NAME, else RunPod's pod id (stable across restarts, unlike the container's host name)."""
    var = "NODE_NAME" if _get(env, "NODE_NAME") else "RUNPOD_POD_ID"
    raw = _get(env, var) or hostname.split(".")[0]
    name = raw.lower()
    if not _NAME.match(name):
        raise PodError(var if _get(env, var) else "NODE_NAME",
                       f"{raw!r} is not usable as a Slurm node name (letters, digits, '-')")
    return name


def parse_workers(raw: str | None) -> tuple[Worker, ...]:
    """WORKER_NODES: `name[:addr],name[:addr]`."""
    if not raw:
        return ()
    workers: list[Worker] = []
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, _, addr = item.partition(":")
        name = name.strip().lower()
        if not _NAME.match(name):
            raise PodError("WORKER_NODES", f"{item!r}: {name!r} is not a node name (expected name:address,...)")
        if addr and not _HOST.match(addr.strip()):
            raise PodError("WORKER_NODES", f"{item!r}: {addr!r} is not a host name or IP address")
        workers.append(Worker(name, addr.strip() or None))
    return tuple(workers)


def load_settings(
    env: Mapping[str, str],
    *,
    hostname: str,
    resolve: Callable[[str], str | None],
    nvml_gpus: Callable[[], int | None],
) -> PodSettings:
    """Validate the whole environment before anything is written or started."""
    role = (_get(env, "NODE_ROLE") or "").lower()
    if role not in ROLES:
        shown = _get(env, "NODE_ROLE")
        raise PodError("NODE_ROLE", "missing: set head or worker" if shown is None
                       else f"{shown!r} is not head or worker")
    munge_key = decode_key(env)  # the one secret every pod needs: checked first
    cluster = _get(env, "CLUSTER_NAME") or DEFAULT_CLUSTER
    if not _CLUSTER.match(cluster):
        raise PodError("CLUSTER_NAME", f"{cluster!r}: lower-case letters, digits, '-' or '_', at most 40")
    node_name = node_name_from(env, hostname)

    pod_id = _get(env, "RUNPOD_POD_ID")
    node_addr = _get(env, "NODE_ADDR")
    if node_addr is None:
        # With global networking every pod reaches the others as <POD_ID>.runpod.internal.
        node_addr = f"{pod_id.lower()}.{RUNPOD_INTERNAL}" if pod_id else resolve(node_name)
    if not node_addr or not _HOST.match(node_addr):
        raise PodError("NODE_ADDR", f"{node_addr!r}: set the address other pods reach this one at")

    head_host = _get(env, "HEAD_NODE_HOST") or _get(env, "HEAD_NODE_IP")
    if role == "worker" and head_host is None:
        raise PodError("HEAD_NODE_HOST", "missing: a worker needs the head's address "
                                         "(HEAD_NODE_HOST=<head POD_ID>.runpod.internal, or HEAD_NODE_IP)")
    if head_host is not None and not _HOST.match(head_host):
        raise PodError("HEAD_NODE_HOST", f"{head_host!r} is not a host name or IP address")

    gpus = _int(env, "GPU_COUNT", None, 0, 64)
    if gpus is None:
        gpus = nvml_gpus()
    if gpus is None:
        gpus = _int(env, "RUNPOD_GPU_COUNT", None, 0, 64)
    if gpus is None:
        raise PodError("GPU_COUNT", "NVML sees no GPU and RUNPOD_GPU_COUNT is not set: set GPU_COUNT")

    profile = _get(env, "EW_PROFILE")
    if profile is not None and not _PROFILE.match(profile):
        raise PodError("EW_PROFILE", f"{profile!r} is not a profile name (see `exporter-watchdog models`)")
    claim = _int(env, "EW_CLAIM_GPUS", None, 1, 64)
    if claim is not None and claim > gpus:
        raise PodError("EW_CLAIM_GPUS", f"{claim} is more than the pod's {gpus} GPUs")
    root = Path(_get(env, "EW_ROOT") or "/")
    if not root.is_absolute():
        raise PodError("EW_ROOT", f"{str(root)!r} is not an absolute path")
    device_dir = _get(env, "GPU_DEVICE_DIR") or "/dev"
    return PodSettings(
        role=role, cluster=cluster, node_name=node_name, node_addr=node_addr, hostname=hostname.split(".")[0],
        head_host=head_host, workers=parse_workers(_get(env, "WORKER_NODES")), gpus=gpus,
        munge_key=munge_key, api_key=_get(env, "EW_API_KEY"), profile=profile, claim_gpus=claim,
        cooldown_seconds=_float(env, "EW_COOLDOWN_SECONDS", 60.0),
        server_port=_int(env, "EW_SERVER_PORT", 8000, 1, 65535) or 8000,
        metrics_port=_int(env, "EW_METRICS_PORT", 9400, 1, 65535) or 9400,
        squeue_interval_seconds=_float(env, "EW_SQUEUE_INTERVAL", 2.0),
        max_nodes=_int(env, "MAX_NODES", 64, 1, 65000) or 64,
        partition=_get(env, "PARTITION") or "gpu",
        root=root, gpu_device_dir=device_dir, simulated_gpus=_flag(env, "EW_SIMULATED_GPUS"),
        head_wait_seconds=_float(env, "HEAD_WAIT_SECONDS", 300.0),
    )
