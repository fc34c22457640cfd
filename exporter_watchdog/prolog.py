"""`exporter-watchdog prolog`: Slurm's Prolog asks the node's daemon to hand back the job's GPUs first.

When no daemon answers (none runs, or it is hung: stopped, stuck) the Prolog stops the server itself
if the server holds any of the job's GPUs, and returns once its processes are gone. A failing Prolog
drains the node and requeues the job, so this command always exits 0; it logs what it did and never
runs past its --timeout.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from exporter_watchdog.config import Config, default_config_path, load_config

# The daemon escalates to SIGKILL after server.stop_timeout_seconds (30 s by default): wait a bit longer.
DEFAULT_MARGIN = 15.0
# A daemon that has not taken the request within this is hung (stopped, stuck): stop the server here.
DAEMON_TIMEOUT = 2.0
# Time kept back from the daemon's answer for stopping the server here if the daemon fails.
KILL_RESERVE = 3.0


def job_gpus(env: Mapping[str, str]) -> list[int] | None:
    """The job's GPU indices on this node (SLURM_JOB_GPUS, else CUDA_VISIBLE_DEVICES); None if unreadable."""
    from exporter_watchdog.detect.scontrol import parse_index_list

    for key in ("SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES"):
        value = env.get(key, "").strip()
        if value:
            try:
                return sorted(parse_index_list(value))
            except ValueError:
                return None
    return []


def _log(log_file: Path | None, message: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} exporter-watchdog prolog: {message}"
    print(line, file=sys.stderr)
    if log_file is not None:
        try:
            with open(log_file, "a") as fh:
                fh.write(line + "\n")
        except OSError:
            pass


def run_prolog(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """Ask the daemon to release the job's GPUs, or stop its server here if it cannot; always 0."""
    env = os.environ if env is None else env
    log_file = Path(args.log) if args.log else None
    job = env.get("SLURM_JOB_ID", "?")
    started = time.monotonic()
    try:
        gpus = job_gpus(env)
        if gpus == []:
            _log(log_file, f"job {job}: no GPUs, nothing to do")
            return 0
        config = load_config(Path(args.config) if args.config else default_config_path())
        timeout = args.timeout if args.timeout is not None else config.server.stop_timeout_seconds + DEFAULT_MARGIN
        if gpus is None:
            # GPUs we cannot read: ask for all of them (a job never waits on our uncertainty).
            gpus = list(range(64))
        _release(config, job, gpus, started + timeout, min(args.daemon_timeout, timeout), log_file)
    except BaseException as exc:  # noqa: BLE001 - a Prolog must never fail
        _log(log_file, f"job {job}: error ignored: {exc!r}")
    return 0


def _release(config: Config, job: str, gpus: list[int], deadline: float, daemon_timeout: float,
             log_file: Path | None) -> None:
    from exporter_watchdog.act.control import ControlError, Exchange

    started = time.monotonic()
    reserve = min(KILL_RESERVE, (deadline - started) / 2)  # kept for stopping the server here
    payload = {"cmd": "release", "job_id": job, "gpus": gpus, "timeout": max(deadline - reserve - started, 0.0)}
    try:
        with Exchange(config.control_socket, payload, daemon_timeout) as exchange:
            answer = exchange.answer(daemon_timeout)
            if answer.get("accepted"):
                answer = exchange.answer(deadline - reserve - time.monotonic())
    except ControlError as exc:  # nothing listens, or it did not answer in time (hung)
        _log(log_file, f"job {job}: {exc}; stopping the server here if it holds GPUs {gpus}")
        _failsafe(config, job, gpus, deadline, log_file)
        return
    took = (time.monotonic() - started) * 1000
    if not answer.get("ok"):
        _log(log_file, f"job {job}: daemon refused: {answer.get('error')} ({took:.0f} ms); stopping the server here")
        _failsafe(config, job, gpus, deadline, log_file)
    elif answer.get("released"):
        _log(log_file, f"job {job}: GPUs {gpus} released, the server is gone ({took:.0f} ms)")
    elif answer.get("timed_out"):
        _log(log_file, f"job {job}: GPUs {gpus} still held after {took / 1000:.1f} s; stopping the server here")
        _failsafe(config, job, gpus, deadline, log_file)
    else:
        _log(log_file, f"job {job}: GPUs {gpus} were not ours ({took:.0f} ms)")


def _failsafe(config: Config, job: str, gpus: list[int], deadline: float, log_file: Path | None) -> None:
    from exporter_watchdog.act.failsafe import stop_for_job
    from exporter_watchdog.act.record import MARKER_ENV, RECORD_NAME

    outcome = stop_for_job(config.state_dir / RECORD_NAME, MARKER_ENV, set(gpus), deadline - time.monotonic())
    _log(log_file, f"job {job}: {outcome.message}")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prolog", help="Slurm Prolog: hand the job's GPUs back before its tasks start",
        description="Install as Slurm's Prolog (with PrologFlags=Alloc or Contain). Reads the job's GPUs from "
                    "SLURM_JOB_GPUS (else CUDA_VISIBLE_DEVICES), asks the node's daemon to release them if they "
                    "are ours and returns once the server's processes are gone. If no daemon answers (dead, hung) it "
                    "stops the server itself when the server holds any of the job's GPUs. Never runs past "
                    "--timeout; always exits 0: a failing Prolog would drain the node.",
    )
    p.add_argument("--config", "-c", metavar="PATH", help="the daemon's config file (for its control socket)")
    p.add_argument("--timeout", type=float, default=None,
                   help="longest wait in seconds (default: server.stop_timeout_seconds + 15)")
    p.add_argument("--daemon-timeout", type=float, default=DAEMON_TIMEOUT,
                   help=f"a daemon that has not taken the request within this many seconds is hung: stop the "
                        f"server here (default {DAEMON_TIMEOUT:g})")
    p.add_argument("--log", metavar="FILE", help="also append what was done to FILE")
    p.set_defaults(func=run_prolog)
