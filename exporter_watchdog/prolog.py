"""`exporter-watchdog prolog`: Slurm's Prolog asks the node's daemon to hand back the job's GPUs first.

A failing Prolog drains the node and requeues the job, so this command always exits 0; it logs what
it did and never waits longer than its bound. With no daemon running it returns at once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from exporter_watchdog.config import default_config_path, load_config

# The daemon escalates to SIGKILL after server.stop_timeout_seconds (30 s by default): wait a bit longer.
DEFAULT_MARGIN = 15.0


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
    """Ask the daemon to release the job's GPUs; always 0."""
    env = os.environ if env is None else env
    log_file = Path(args.log) if args.log else None
    job = env.get("SLURM_JOB_ID", "?")
    started = time.monotonic()
    try:
        gpus = job_gpus(env)
        if gpus == []:
            _log(log_file, f"job {job}: no GPUs, nothing to do")
            return 0
        from exporter_watchdog.act.control import ControlError, request

        config = load_config(Path(args.config) if args.config else default_config_path())
        timeout = args.timeout if args.timeout is not None else config.server.stop_timeout_seconds + DEFAULT_MARGIN
        if gpus is None:
            # GPUs we cannot read: ask for all of them (a job never waits on our uncertainty).
            gpus = list(range(64))
        try:
            answer = request(config.control_socket,
                             {"cmd": "release", "job_id": job, "gpus": gpus, "timeout": timeout},
                             timeout=timeout + 5.0)
        except ControlError as exc:
            _log(log_file, f"job {job}: {exc}; nothing to release")
            return 0
        took = (time.monotonic() - started) * 1000
        if not answer.get("ok"):
            _log(log_file, f"job {job}: daemon refused: {answer.get('error')} ({took:.0f} ms)")
        elif answer.get("released"):
            _log(log_file, f"job {job}: GPUs {gpus} released, the server is gone ({took:.0f} ms)")
        elif answer.get("timed_out"):
            _log(log_file, f"job {job}: GPUs {gpus} still held after {timeout:g} s; letting the job start")
        else:
            _log(log_file, f"job {job}: GPUs {gpus} were not ours ({took:.0f} ms)")
    except BaseException as exc:  # noqa: BLE001 - a Prolog must never fail
        _log(log_file, f"job {job}: error ignored: {exc!r}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prolog", help="Slurm Prolog: hand the job's GPUs back before its tasks start",
        description="Install as Slurm's Prolog (with PrologFlags=Alloc or Contain). Reads the job's GPUs from "
                    "SLURM_JOB_GPUS (else CUDA_VISIBLE_DEVICES), asks the node's daemon to release them if they "
                    "are ours and returns once the server's processes are gone, or after --timeout. Always exits "
                    "0: a failing Prolog would drain the node.",
    )
    p.add_argument("--config", "-c", metavar="PATH", help="the daemon's config file (for its control socket)")
    p.add_argument("--timeout", type=float, default=None,
                   help="longest wait in seconds (default: server.stop_timeout_seconds + 15)")
    p.add_argument("--log", metavar="FILE", help="also append what was done to FILE")
    p.set_defaults(func=run_prolog)
