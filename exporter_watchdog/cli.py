"""The `exporter-watchdog` command: argument parsing and dispatch; the wiring lives in serve.py."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exporter_watchdog import __version__
from exporter_watchdog.config import Config, ConfigError, default_config_path, load_config

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3


def _config_path(args: argparse.Namespace) -> Path | None:
    return Path(args.config) if getattr(args, "config", None) else default_config_path()


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _fail(message: str, code: int = EXIT_FAIL) -> int:
    print(f"exporter-watchdog: {message}", file=sys.stderr)
    return code


# --- serve -------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from exporter_watchdog.serve import StartupError, serve

    try:
        return serve(_config_path(args), demo=args.demo, listen=args.listen, exporter_only=args.exporter_only,
                     simulated_gpus=args.simulated_gpus)
    except StartupError as exc:
        return _fail(str(exc))


# --- status, switch, models, check -------------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from exporter_watchdog.act.control import ControlError, request
    from exporter_watchdog.status import render_status

    config = _load(args)
    try:
        answer = request(config.control_socket, {"cmd": "status"}, timeout=args.timeout)
    except ControlError as exc:
        if args.json:
            print(json.dumps({"state": "not running", "error": str(exc)}))
        return _fail(str(exc), EXIT_NOT_RUNNING)
    if not answer.get("ok"):
        return _fail(str(answer.get("error")))
    doc = answer["status"]
    print(json.dumps(doc, indent=2) if args.json else render_status(doc))
    return EXIT_OK


def cmd_switch(args: argparse.Namespace) -> int:
    from exporter_watchdog.act.control import ControlError, request
    from exporter_watchdog.act.statefile import ensure_state_dir, set_active_profile
    from exporter_watchdog.profiles import ProfileError, check_runnable, find_profile, models_dir

    config = _load(args)
    try:
        profile = find_profile(models_dir(config), args.profile)
    except ProfileError as exc:
        return _fail(str(exc), EXIT_USAGE)
    why = check_runnable(profile, config, config.claim.gpus)
    if why:
        return _fail(why, EXIT_USAGE)
    try:
        answer = request(config.control_socket, {"cmd": "switch", "profile": profile.name}, timeout=args.timeout)
    except ControlError:
        ensure_state_dir(config.state_dir)
        set_active_profile(config.state_dir, profile.name, config.server.profile)
        print(f"{profile.name} is now the active profile; no daemon is running, it is used at the next start")
        return EXIT_OK
    if not answer.get("ok"):
        return _fail(str(answer.get("error")), EXIT_USAGE)
    print(f"switched to {profile.name}: the daemon restarts its server on it")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    from exporter_watchdog.act.control import ControlError, request
    from exporter_watchdog.act.statefile import active_profile
    from exporter_watchdog.profiles import ProfileError, check_runnable, list_profiles, load_profile, models_dir

    config = _load(args)
    directory = models_dir(config)
    try:  # the running daemon knows best (it may run with --demo defaults)
        active = request(config.control_socket, {"cmd": "status"}, timeout=2.0)["status"]["profile"]
    except (ControlError, KeyError, TypeError):
        active = active_profile(config.state_dir, config.server.profile)
    paths = list_profiles(directory)
    if not paths:
        return _fail(f"no profiles in {directory}")
    rows = []
    for path in paths:
        try:
            profile = load_profile(path)
            note = check_runnable(profile, config, config.claim.gpus)
            rows.append((path.stem, profile.model, "cannot run here: " + note if note else profile.description))
        except ProfileError as exc:
            rows.append((path.stem, "-", f"INVALID: {exc}"))
    width = max(len(r[0]) for r in rows) + 2
    mwidth = max(len(r[1]) for r in rows) + 2
    for name, model, desc in rows:
        mark = "*" if name == active else " "
        print(f"{mark} {name:<{width}}{model:<{mwidth}}{desc}")
    if active and active not in {r[0] for r in rows}:
        print(f"(active profile {active!r} has no file in {directory})")
    print(f"\n* active profile; profiles live in {directory}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from exporter_watchdog.act.statefile import active_profile
    from exporter_watchdog.core.decide import pick_gpus
    from exporter_watchdog.profiles import (
        ProfileError,
        build_launch,
        check_runnable,
        list_profiles,
        load_profile,
        models_dir,
    )

    config = _load(args)
    print(f"config: {config.source}: OK (node {config.node.name}, state dir {config.state_dir})")
    node_gpus = config.node.gpus or config.claim.gpus or 1
    claim = min(config.claim.gpus or node_gpus, node_gpus)
    gpus = pick_gpus(frozenset(), node_gpus, claim) or tuple(range(claim))
    active = active_profile(config.state_dir, config.server.profile)
    directory = models_dir(config)
    failures = 0
    for path in list_profiles(directory):
        try:
            profile = load_profile(path)
            launch = build_launch(profile, config, gpus)
        except (ProfileError, ConfigError) as exc:
            failures += 1
            print(f"\n{path.stem}: INVALID: {exc}")
            continue
        why = check_runnable(profile, config, claim)
        mark = " (active)" if profile.name == active else ""
        status = f"cannot run on this node: {why}" if why else "OK"
        print(f"\n{profile.name}{mark}: {status}")
        print(f"  on GPUs {','.join(map(str, gpus))} of {node_gpus}:")
        print(f"  command: {shlex.join(launch.argv)}")
        for key, value in sorted(launch.env_changes.items()):
            shown = "(from server.api_key_file)" if key == "VLLM_API_KEY" else value
            print(f"  env:     {key}={shown}")
        print(f"  health:  {launch.health_url} (start-up timeout {launch.startup_timeout_seconds:g} s)")
        if why and profile.name == active:
            failures += 1
    if active and not (directory / f"{active}.yaml").is_file():
        print(f"\nactive profile {active!r}: no such profile in {directory}")
        failures += 1
    if config.tunnel.enabled:
        failures += _check_tunnel(config)
    return EXIT_USAGE if failures else EXIT_OK


def _check_tunnel(config: Config) -> int:
    """The connector's command line and the ingress it publishes (never the token); 1 on a problem."""
    from exporter_watchdog.act.tunnel.launch import (
        INGRESS_FILE,
        check_files,
        connector_argv,
        ingress_rules,
        public_url,
        render_local_config,
    )

    print(f"\ntunnel: {public_url(config) or '(no tunnel.hostname)'}")
    try:
        check_files(config)
    except ConfigError as exc:
        print(f"  INVALID: {exc}")
        return 1
    local = config.tunnel.config_file is not None
    print(f"  command: {shlex.join(connector_argv(config, config.state_dir / INGRESS_FILE if local else None))}")
    if local:
        print(f"  runs with {config.state_dir / INGRESS_FILE}, written at each start:")
        print("    " + render_local_config(config).rstrip().replace("\n", "\n    "))
        return 0
    rules = json.dumps({"config": {"ingress": ingress_rules(config)}})
    print("  dashboard-managed: Cloudflare pushes this tunnel's ingress; publish only the API by setting it to")
    print(f"    {rules}")
    print("  (PUT /accounts/ACCOUNT_ID/cfd_tunnel/TUNNEL_ID/configurations, or Terraform: see docs/tunnel.md)")
    return 0


# --- demo --------------------------------------------------------------------------------------------


def _demo_node(args: argparse.Namespace) -> Any:
    from exporter_watchdog.demo.node import DemoNode
    from exporter_watchdog.serve import load_serve_config

    config = load_serve_config(_config_path(args), demo=True, listen=None, exporter_only=False)
    return DemoNode(config.state_dir / "demo-node", config.node.name, config.node.gpus or 4)


def _parse_gpus(text: str) -> list[int]:
    from exporter_watchdog.detect.scontrol import parse_index_list

    try:
        return sorted(parse_index_list(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--gpus {text!r}: expected indices like 2,3 or 0-1") from None


def cmd_demo_job(args: argparse.Namespace) -> int:
    from exporter_watchdog.demo.node import DemoError

    node = _demo_node(args)
    try:
        if args.list:
            jobs = node.jobs() if node.exists else []
            if not jobs:
                print("no demo jobs")
            for job in jobs:
                left = "until cancelled" if job.ends_at is None else f"{max(job.ends_at - time.time(), 0):.0f} s left"
                print(f"job {job.job_id}: GPUs {','.join(map(str, job.gpus)) or 'none (CPU only)'}, {left}")
            return EXIT_OK
        if args.cancel:
            job = node.cancel(args.cancel)
            print(f"job {job.job_id} cancelled")
            return EXIT_OK
        job = node.submit(gpus=args.gpus, count=args.num_gpus, seconds=args.seconds)
    except DemoError as exc:
        return _fail(str(exc), EXIT_USAGE)
    span = "until cancelled" if job.ends_at is None else f"for {args.seconds:g} s"
    print(f"job {job.job_id} running on GPUs {','.join(map(str, job.gpus)) or 'none (CPU only)'} {span}")
    if args.wait and job.ends_at is not None:
        while node.job(job.job_id) is not None:
            time.sleep(0.2)
        print(f"job {job.job_id} ended")
    return EXIT_OK


def cmd_demo_llm(args: argparse.Namespace) -> int:
    from exporter_watchdog.demo.llm import run_stub, stub_config_from_args

    run_stub(stub_config_from_args(args))
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------------------


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="PATH",
                   help="config file (default: $EXPORTER_WATCHDOG_CONFIG, /etc/exporter-watchdog/config.yaml, "
                        "~/.config/exporter-watchdog/config.yaml, else built-in defaults)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exporter-watchdog",
        description="Serve an LLM on a Slurm node's idle GPUs, hand them back the instant a job needs them, "
                    "and export DCGM-compatible GPU metrics on :9400.",
    )
    parser.add_argument("--version", action="version", version=f"exporter-watchdog {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("serve", help="run the daemon", description="Run the daemon in the foreground.")
    _add_config(p)
    p.add_argument("--demo", action="store_true",
                   help="run on an embedded demo node: simulated GPUs and Slurm jobs, the demo stub server")
    p.add_argument("--listen", metavar="HOST:PORT", help="metrics/status address (overrides metrics.listen)")
    p.add_argument("--exporter-only", action="store_true",
                   help="export GPU metrics only; never start a server (overrides exporter_only)")
    p.add_argument("--simulated-gpus", action="store_true",
                   help="real Slurm, but simulated GPU metrics for node.gpus GPUs (machines without GPUs; tests)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="show what the running daemon is doing")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print JSON (state, claimed_gpus, profile, server_pid, ...)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("models", help="list model profiles and mark the active one")
    _add_config(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("switch", help="make a profile active and restart the server on it",
                       description="Make PROFILE the active profile (kept across restarts); a running daemon "
                                   "restarts its server on it without restarting itself.")
    _add_config(p)
    p.add_argument("profile", metavar="PROFILE", help="profile name (see `exporter-watchdog models`)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the daemon (default 10)")
    p.set_defaults(func=cmd_switch)

    p = sub.add_parser("check", help="validate the config and every profile; print the exact command lines",
                       description="Validate the config and every profile, and print the command line and "
                                   "environment each profile would run with. Exit 2 on any problem.")
    _add_config(p)
    p.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="drive the embedded demo node, or run its stub LLM server alone")
    demo_sub = demo.add_subparsers(dest="demo_command", metavar="DEMO_COMMAND")
    demo_sub.required = True
    p = demo_sub.add_parser("job", help="run, list or cancel simulated Slurm jobs on the running demo node")
    _add_config(p)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--gpus", type=_parse_gpus, metavar="LIST", help="GPU indices, e.g. 2,3 or 0-1")
    what.add_argument("--num-gpus", type=int, metavar="N", help="take the N lowest free GPUs, as Slurm does")
    what.add_argument("--list", action="store_true", help="list the demo jobs")
    what.add_argument("--cancel", metavar="JOB", help="end a demo job now")
    p.add_argument("--seconds", type=float, default=60.0,
                   help="how long the job runs (default 60; 0 = until cancelled)")
    p.add_argument("--wait", action="store_true", help="block until the job ends")
    p.set_defaults(func=cmd_demo_job)
    p = demo_sub.add_parser("llm", help="run the stub OpenAI-compatible server alone")
    from exporter_watchdog.demo.llm import add_llm_arguments

    add_llm_arguments(p)
    p.set_defaults(func=cmd_demo_llm)
    from exporter_watchdog.demo import faults as demo_faults

    demo_faults.register(demo_sub, _add_config, _demo_node)

    from exporter_watchdog import prolog, targets
    from exporter_watchdog.bench import command as bench
    from exporter_watchdog.replay import command as replay
    from exporter_watchdog.runpod import command as pod

    for module in (prolog, bench, targets, replay, pod):
        module.register(sub)
    return parser


def _prolog_parser() -> argparse.ArgumentParser:
    """Only the `prolog` subcommand: Slurm runs it before every job, so it imports as little as it can."""
    from exporter_watchdog import prolog

    parser = argparse.ArgumentParser(prog="exporter-watchdog")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    prolog.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = _prolog_parser() if words[:1] == ["prolog"] else build_parser()
    args = parser.parse_args(words)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        return _fail(f"config error: {exc}", EXIT_USAGE)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    return code


if __name__ == "__main__":
    sys.exit(main())
