"""`exporter-watchdog targets`: write Prometheus's file_sd targets for every node that `sinfo` lists."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from exporter_watchdog.detect.runner import CommandRunner, run_command

DAEMON_PORT = 9400
# vLLM's own default port; the daemon's `server.port` when the fleet uses another one.
DEFAULT_SERVER_PORT = 8000
SINFO_TIMEOUT_SECONDS = 30.0

# The `job` label of each group names the scrape job in prometheus/prometheus.yml that keeps it.
JOB_DAEMON = "exporter-watchdog"
JOB_SERVER = "vllm"
JOB_TUNNEL = "cloudflared"
JOB_SLURM_EXPORTER = "slurm-exporter"

# Slurm node names are host names; anything else in sinfo's output is not a node.
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:(\d{1,5})$")


class TargetsError(Exception):
    """A problem the user must fix; the message says what and where."""


def sinfo_argv(partition: str | None) -> list[str]:
    """The sinfo command that prints one node name per line."""
    # --Node prints expanded names (no hostlists), once per partition the node is in.
    argv = ["sinfo", "--noheader", "--Node", "--format=%N"]
    if partition:
        argv.append(f"--partition={partition}")
    return argv


def parse_nodes(text: str) -> list[str]:
    """Node names from sinfo's output, each once, in sinfo's order."""
    nodes: list[str] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        name = raw.strip()
        if not name:
            continue
        if not _NODE_NAME.match(name):
            raise TargetsError(f"sinfo output line {number}: {name!r} is not a node name")
        if name not in seen:
            seen.add(name)
            nodes.append(name)
    return nodes


def list_nodes(runner: CommandRunner, partition: str | None) -> list[str]:
    """Ask sinfo for the nodes; raise TargetsError when it cannot answer or lists none."""
    argv = sinfo_argv(partition)
    try:
        result = runner(argv, SINFO_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise TargetsError("sinfo not found: install the Slurm client or put it on PATH") from None
    except TimeoutError:
        raise TargetsError(f"sinfo did not answer within {SINFO_TIMEOUT_SECONDS:g} s") from None
    if result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip() or "no output"
        raise TargetsError(f"{' '.join(argv)} failed with exit code {result.returncode}: {detail}")
    nodes = parse_nodes(result.stdout)
    if not nodes:
        where = f" in partition {partition!r}" if partition else ""
        raise TargetsError(f"sinfo listed no nodes{where}; not writing an empty targets file")
    return nodes


def build_targets(
    nodes: Sequence[str],
    *,
    daemon_port: int = DAEMON_PORT,
    server_port: int = DEFAULT_SERVER_PORT,
    tunnel_metrics_port: int | None = None,
    slurm_exporters: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The file_sd target groups: one per node and component, each labelled with its node."""
    groups: list[dict[str, Any]] = []
    for node in nodes:
        groups.append(_group(f"{node}:{daemon_port}", JOB_DAEMON, node))
        groups.append(_group(f"{node}:{server_port}", JOB_SERVER, node))
        if tunnel_metrics_port is not None:
            groups.append(_group(f"{node}:{tunnel_metrics_port}", JOB_TUNNEL, node))
    for address in slurm_exporters:
        groups.append({"targets": [address], "labels": {"job": JOB_SLURM_EXPORTER}})
    return groups


def _group(address: str, job: str, node: str) -> dict[str, Any]:
    return {"targets": [address], "labels": {"job": job, "node": node}}


def render(groups: list[dict[str, Any]]) -> str:
    """The JSON text of a file_sd file."""
    return json.dumps(groups, indent=2) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` in one step: Prometheus watches the file and must never read half of it."""
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 1-65535")
    return value


def _host_port(text: str) -> str:
    match = _HOST_PORT.match(text)
    if not match or not 1 <= int(match.group(1)) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def register(subparsers: Any) -> None:
    """Add the `targets` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "targets",
        help="write Prometheus file_sd targets for every Slurm node",
        description=(
            "Write the file_sd targets file that prometheus/prometheus.yml reads: for each node sinfo "
            "lists, its daemon (:9400) and its server, optionally its cloudflared metrics, plus the "
            "cluster's Slurm exporter. Prometheus picks up a new file by itself."
        ),
    )
    parser.add_argument(
        "--output", "-o", metavar="PATH", default="-",
        help="file to write, replaced atomically (default: - for stdout)",
    )
    parser.add_argument("--partition", "-p", metavar="NAME", help="only the nodes of this Slurm partition")
    parser.add_argument(
        "--daemon-port", type=_port, default=DAEMON_PORT, metavar="PORT",
        help=f"the daemon's metrics port (default: {DAEMON_PORT})",
    )
    parser.add_argument(
        "--server-port", type=_port, default=DEFAULT_SERVER_PORT, metavar="PORT",
        help=f"the server's port, the config's server.port (default: {DEFAULT_SERVER_PORT})",
    )
    parser.add_argument(
        "--tunnel-metrics-port", type=_port, default=None, metavar="PORT",
        help="cloudflared's --metrics port on each node (default: no cloudflared targets)",
    )
    parser.add_argument(
        "--slurm-exporter", type=_host_port, action="append", default=[], metavar="HOST:PORT",
        help="a Slurm exporter to scrape, e.g. head:9341 (repeatable)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, runner: CommandRunner = run_command) -> int:
    """Run `targets` with parsed arguments; 0 on success, 1 with a message on stderr otherwise."""
    try:
        nodes = list_nodes(runner, args.partition)
        text = render(
            build_targets(
                nodes,
                daemon_port=args.daemon_port,
                server_port=args.server_port,
                tunnel_metrics_port=args.tunnel_metrics_port,
                slurm_exporters=args.slurm_exporter,
            )
        )
        if args.output == "-":
            sys.stdout.write(text)
        else:
            try:
                write_atomically(Path(args.output), text)
            except OSError as exc:
                raise TargetsError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    except TargetsError as exc:
        print(f"exporter-watchdog targets: {exc}", file=sys.stderr)
        return 1
    if args.output != "-":
        print(f"wrote {len(nodes)} node(s) to {args.output}", file=sys.stderr)
    return 0
