"""`exporter-watchdog serve` with NVML faked at the backend interface, for tests beside a real Slurm.

    python -m tests.support.fake_nvml_serve --gpu-processes FILE serve --config CONFIG

The node's GPUs are SimulatedGpus (the demo's stand-in for NVML, behind the same GpuBackend interface);
the processes NVML would list on each GPU come from a JSON file the test writes, {"GPU": [[pid, bytes]]}.
Everything else is the real daemon: real cgroups, the real scontrol, real /proc/PID/cgroup of those PIDs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exporter_watchdog.config import Config, ConfigError
from exporter_watchdog.demo.gpus import SimulatedGpus
from exporter_watchdog.detect.runner import run_command
from exporter_watchdog.serve import Node, serve


def processes_from(path: Path) -> dict[int, list[tuple[int, int]]]:
    """The file's GPU -> [(pid, bytes)]; {} while it is missing or half-written."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return {int(gpu): [(int(pid), int(used)) for pid, used in procs] for gpu, procs in doc.items()}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpu-processes", type=Path, required=True)
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args()

    def node(config: Config) -> Node:
        count = config.node.gpus or 4
        gpus = SimulatedGpus(count, lambda: 0.3, processes=lambda g: processes_from(args.gpu_processes).get(g, []))
        return Node(gpus=count, cgroup_root=config.slurm.cgroup_root, runner=run_command, backend=gpus)

    try:
        return serve(args.config, demo=False, listen=None, exporter_only=False, node_factory=node)
    except ConfigError as exc:
        print(f"exporter-watchdog: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
