"""`exporter-watchdog pod`: what docker/runpod/entrypoint.sh runs before it starts any daemon.

`pod render` validates the environment, writes the key file(s) and every config, and leaves the
values the entrypoint needs in /run/exporter-watchdog/pod.env. `pod wait-head` waits, bounded, for
the head's slurmctld port.
"""

from __future__ import annotations

import argparse
import glob
import os
import pwd
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exporter_watchdog.runpod.render import (
    CONFIG_PATH,
    CONFIGLESS_CONF,
    CTLD_PORT,
    PROLOG_PATH,
    RUN_DIR,
    SlurmInfo,
    cgroup_conf,
    daemon_config_text,
    gres_conf,
    parse_version,
    prolog_script,
    shell_env,
    slurm_conf,
    slurmd_conf,
)
from exporter_watchdog.runpod.settings import PodError, PodSettings, load_settings

EXIT_CONFIG = 2
# Where Debian/Ubuntu install Slurm's plugins; gpu_nvml.so comes with slurm-wlm-nvml-plugin.
PLUGIN_GLOBS = ("/usr/lib/*/slurm-wlm/gpu_nvml.so", "/usr/lib/*/slurm/gpu_nvml.so", "/usr/lib64/slurm/gpu_nvml.so")


def _say(message: str) -> None:
    print(f"exporter-watchdog pod: {message}", file=sys.stderr, flush=True)


def _resolve(name: str) -> str | None:
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def _nvml_gpus() -> int | None:
    try:
        from exporter_watchdog.metrics.nvml import GpuUnavailable, NvmlBackend

        backend = NvmlBackend.open()
    except (GpuUnavailable, ImportError, OSError):
        return None
    try:
        return backend.device_count()
    finally:
        backend.close()


def slurm_info(slurmd: str = "slurmd") -> SlurmInfo:
    """The installed Slurm's version (`slurmd -V`) and whether NVML autodetection is built."""
    try:
        out = subprocess.run([slurmd, "-V"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PodError("PATH", f"cannot run {slurmd} -V: {exc}") from None
    try:
        version = parse_version(out.stdout + out.stderr)
    except ValueError as exc:
        raise PodError("PATH", str(exc)) from None
    return SlurmInfo(version=version, nvml_plugin=any(glob.glob(g) for g in PLUGIN_GLOBS))


def _owner(user: str) -> tuple[int, int]:
    """uid and gid of `user`, or our own when we are not root (nothing to change then)."""
    if os.geteuid() != 0:
        return os.geteuid(), os.getegid()
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PodError("EW_MUNGE_USER", f"no user {user!r} here") from None
    return entry.pw_uid, entry.pw_gid


def _mkdir(path: Path, mode: int = 0o755, owner: tuple[int, int] | None = None) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    if owner is not None and os.geteuid() == 0:
        os.chown(path, *owner)


def write_file(path: Path, data: bytes, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace `path` atomically; the content is never readable with a looser mode or owner."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None and os.geteuid() == 0:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def render(settings: PodSettings, slurm: SlurmInfo, munge_user: str, exe: list[str]) -> dict[str, str]:
    """Write every file of the pod; return the values for pod.env."""
    s = settings
    munge = _owner(munge_user)
    run = Path(RUN_DIR)
    _mkdir(run, 0o755)
    for folder in ("/var/log/slurm", "/var/spool/slurmd", "/var/lib/exporter-watchdog", "/var/log/exporter-watchdog"):
        _mkdir(s.path(folder))
    _mkdir(s.path("/etc/munge"), 0o700, munge)
    _mkdir(s.path("/var/lib/munge"), 0o700, munge)
    _mkdir(s.path("/var/log/munge"), 0o700, munge)
    _mkdir(Path("/run/munge"), 0o755, munge)
    key_file = s.path("/etc/munge/munge.key")
    write_file(key_file, s.munge_key, 0o400, munge)
    api_key_file: str | None = None
    if s.api_key:
        api_key_file = f"{RUN_DIR}/api-key"
        write_file(Path(api_key_file), s.api_key.encode() + b"\n", 0o400)

    if s.role == "head":
        etc = s.path("/etc/slurm")
        _mkdir(etc)
        _mkdir(s.path("/var/spool/slurmctld"), 0o700)
        write_file(etc / "slurm.conf", slurm_conf(s, slurm).encode(), 0o644)
        write_file(etc / "gres.conf", gres_conf(s, slurm).encode(), 0o644)
        cgroup = cgroup_conf(slurm)
        if cgroup is not None:
            write_file(etc / "cgroup.conf", cgroup.encode(), 0o644)
        slurm_conf_path = str(etc / "slurm.conf")
    else:
        slurm_conf_path = CONFIGLESS_CONF
    write_file(Path(CONFIG_PATH), daemon_config_text(s, api_key_file).encode(), 0o644)
    prolog_log = str(s.path("/var/log/exporter-watchdog/prolog.log"))
    write_file(Path(PROLOG_PATH), prolog_script(exe, prolog_log).encode(), 0o755)
    return {
        "POD_ROLE": s.role,
        "POD_NODE_NAME": s.node_name,
        "POD_NODE_ADDR": s.node_addr,
        "POD_HEAD_HOST": s.head_host or "",
        "POD_CTLD_PORT": str(CTLD_PORT),
        "POD_SLURM_CONF": slurm_conf_path,
        "POD_SLURMD_CONF": slurmd_conf(s),
        "POD_SLURM_LOG_DIR": str(s.path("/var/log/slurm")),
        "POD_MUNGE_USER": munge_user if os.geteuid() == 0 else "",
        "POD_MUNGE_KEY_FILE": str(key_file),
        "POD_MUNGE_SEED_FILE": str(s.path("/var/lib/munge/munge.seed")),
        "POD_MUNGE_LOG_FILE": str(s.path("/var/log/munge/munged.log")),
        "POD_EW_CONFIG": CONFIG_PATH,
        "POD_SIMULATED_GPUS": "1" if s.simulated_gpus else "",
        "POD_HEAD_WAIT_SECONDS": f"{s.head_wait_seconds:g}",
        "POD_SLURM_VERSION": slurm.text,
    }


def cmd_render(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(os.environ, hostname=socket.gethostname(), resolve=_resolve,
                                 nvml_gpus=(lambda: None) if os.environ.get("EW_SIMULATED_GPUS") else _nvml_gpus)
        slurm = slurm_info(args.slurmd)
        exe = [sys.executable, "-m", "exporter_watchdog.cli"]
        values = render(settings, slurm, args.munge_user, exe)
        write_file(Path(RUN_DIR) / "pod.env", shell_env(values).encode(), 0o644)
    except PodError as exc:
        _say(f"{exc}; nothing was started")
        return EXIT_CONFIG
    except OSError as exc:
        _say(f"cannot write the pod's files: {exc}; nothing was started")
        return 1
    _say(f"{settings.role} {settings.node_name} at {settings.node_addr}: {settings.gpus} GPU(s), "
         f"Slurm {slurm.text}, cluster {settings.cluster}, profile {settings.profile or '(none: metrics only)'}")
    return 0


def cmd_wait_head(args: argparse.Namespace) -> int:
    """Bounded wait for the head's slurmctld port, with a log line now and then."""
    started = time.monotonic()
    next_note = 0.0
    while True:
        waited = time.monotonic() - started
        try:
            with socket.create_connection((args.host, args.port), timeout=min(5.0, max(args.timeout - waited, 0.1))):
                _say(f"the head {args.host}:{args.port} answers (after {waited:.1f} s)")
                return 0
        except OSError as exc:
            reason = exc.strerror or str(exc)
        waited = time.monotonic() - started
        if waited >= args.timeout:
            _say(f"the head {args.host}:{args.port} did not answer within {args.timeout:g} s ({reason}); giving up")
            return 1
        if waited >= next_note:
            _say(f"waiting for the head {args.host}:{args.port} (slurmctld): {reason}; "
                 f"{waited:.0f} of {args.timeout:g} s")
            next_note = waited + 10.0
        time.sleep(min(args.interval, max(args.timeout - waited, 0.0)))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `pod` subcommand (used by the RunPod template's entrypoint)."""
    pod = subparsers.add_parser("pod", help="set up a RunPod pod (docker/runpod/entrypoint.sh runs this)")
    sub = pod.add_subparsers(dest="pod_command", metavar="POD_COMMAND")
    sub.required = True
    p = sub.add_parser("render", help="validate the environment; write the keys, Slurm's and the daemon's config",
                       description="Read the pod's environment (docker/runpod/README.md lists it), check all of it, "
                                   "then write the munge key, slurm.conf/gres.conf (head), the daemon's config, "
                                   "the Prolog and /run/exporter-watchdog/pod.env. Exit 2 naming the variable "
                                   "on a bad environment, with nothing written.")
    p.add_argument("--slurmd", default="slurmd", help="slurmd to ask for the Slurm version (default: slurmd)")
    p.add_argument("--munge-user", default=os.environ.get("EW_MUNGE_USER", "munge"),
                   help="user munged runs as, owner of the key file (default: $EW_MUNGE_USER or munge)")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("wait-head", help="wait for the head's slurmctld port, bounded")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=300.0, help="give up after this many seconds (default 300)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between tries (default 1)")
    p.set_defaults(func=cmd_wait_head)
