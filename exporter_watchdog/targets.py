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


def sinfo_argv(partition: str | None, node_addr: bool = False) -> list[str]:
    """The sinfo command that prints one node name (and, with node_addr, its NodeAddr) per line."""
    # --Node prints expanded names (no hostlists), once per partition the node is in.
    argv = ["sinfo", "--noheader", "--Node", "--format=%N %o" if node_addr else "--format=%N"]
    if partition:
        argv.append(f"--partition={partition}")
    return argv


def parse_nodes(text: str) -> list[str]:
    """Node names from sinfo's output, each once, in sinfo's order."""
    return [name for name, _ in parse_node_addrs(text, with_addr=False)]


def parse_node_addrs(text: str, with_addr: bool = True) -> list[tuple[str, str]]:
    """(name, address) from lines `NAME ADDR` (with_addr) or `NAME` (the address is the name)."""
    nodes: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split()
        if not fields:
            continue
        name, addr = fields[0], fields[1] if len(fields) > 1 else fields[0]
        if len(fields) != (2 if with_addr else 1) or not _NODE_NAME.match(name) or not _NODE_NAME.match(addr):
            raise TargetsError(f"sinfo output line {number}: {raw.strip()!r} is not a node name")
        if name not in seen:
            seen.add(name)
            nodes.append((name, addr))
    return nodes


def list_nodes(runner: CommandRunner, partition: str | None) -> list[str]:
    """Ask sinfo for the nodes; raise TargetsError when it cannot answer or lists none."""
    return [name for name, _ in list_node_addrs(runner, partition, node_addr=False)]


def list_node_addrs(runner: CommandRunner, partition: str | None, node_addr: bool) -> list[tuple[str, str]]:
    """(name, address) of every node; the address is Slurm's NodeAddr when node_addr, else the name."""
    argv = sinfo_argv(partition, node_addr)
    try:
        result = runner(argv, SINFO_TIMEOUT_SECONDS)
    except FileNotFoundError:
        raise TargetsError("sinfo not found: install the Slurm client or put it on PATH") from None
    except TimeoutError:
        raise TargetsError(f"sinfo did not answer within {SINFO_TIMEOUT_SECONDS:g} s") from None
    if result.returncode != 0:
        detail = result.stderr.strip() or result.stdout.strip() or "no output"
        raise TargetsError(f"{' '.join(argv)} failed with exit code {result.returncode}: {detail}")
    nodes = parse_node_addrs(result.stdout, with_addr=node_addr)
    if not nodes:
        where = f" in partition {partition!r}" if partition else ""
        raise TargetsError(f"sinfo listed no nodes{where}; not writing an empty targets file")
    return nodes


def build_targets(
    nodes: Sequence[str | tuple[str, str]],
    *,
    daemon_port: int = DAEMON_PORT,
    server_port: int = DEFAULT_SERVER_PORT,
    tunnel_metrics_port: int | None = None,
    slurm_exporters: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """The file_sd target groups: one per node and component, each labelled with its node.

    A node given as (name, address) is scraped at the address and labelled with the name.
    """
    groups: list[dict[str, Any]] = []
    for entry in nodes:
        node, addr = (entry, entry) if isinstance(entry, str) else entry
        groups.append(_group(f"{addr}:{daemon_port}", JOB_DAEMON, node))
        groups.append(_group(f"{addr}:{server_port}", JOB_SERVER, node))
        if tunnel_metrics_port is not None:
            groups.append(_group(f"{addr}:{tunnel_metrics_port}", JOB_TUNNEL, node))
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


def _domain(text: str) -> str:
    suffix = text.strip(".")
    if not suffix or not _NODE_NAME.match(suffix):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS suffix")
    return suffix


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
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--node-addr", action="store_true",
        help="scrape each node at its Slurm NodeAddr (often its IP address) instead of its name",
    )
    where.add_argument(
        "--domain", type=_domain, metavar="SUFFIX",
        help="scrape each node at NAME.SUFFIX, e.g. --domain runpod.internal for the RunPod template's pods",
    )
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
        nodes = list_node_addrs(runner, args.partition, args.node_addr)
        if args.domain:
            nodes = [(name, f"{name}.{args.domain}") for name, _ in nodes]
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
