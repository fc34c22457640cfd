"""Fault injection on the demo node: make the simulated NVML fail for one GPU or all, from another process.

`exporter-watchdog demo fault nvml --gpu 3|all|off [--kind other|lost]` writes a small file in the
demo node's folder; the demo daemon reads it every FAULT_POLL_SECONDS and makes every NVML read of
those GPUs fail (SimulatedGpus.set_fault), as a driver error or a GPU fallen off the bus would.
A demo daemon starts with no fault.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from loguru import logger

from exporter_watchdog.metrics.nvml import GpuErrorKind

FAULT_FILE = "nvml-fault.json"
FAULT_POLL_SECONDS = 0.2


class Faultable(Protocol):
    def set_fault(self, gpu: int, kind: GpuErrorKind | None) -> None: ...


def fault_path(node_root: Path) -> Path:
    return node_root / FAULT_FILE


def write_fault(node_root: Path, gpus: list[int], kind: GpuErrorKind) -> None:
    """Make NVML fail for `gpus` (an empty list heals every GPU); atomic, for the daemon reads it."""
    path = fault_path(node_root)
    if not gpus:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"gpus": sorted(gpus), "kind": kind.value}))
    os.replace(tmp, path)


def read_fault(path: Path) -> dict[int, GpuErrorKind]:
    """GPU -> how its reads fail, from the fault file; {} when there is none or it is unreadable."""
    try:
        doc = json.loads(path.read_text())
        kind = GpuErrorKind(doc["kind"])
        return {int(g): kind for g in doc["gpus"]}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("demo: ignoring {}: {}", path, exc)
        return {}


class FaultSwitch:
    """A thread in the demo daemon that applies the fault file to the simulated GPUs."""

    def __init__(self, node_root: Path, gpus: Faultable, poll_seconds: float = FAULT_POLL_SECONDS) -> None:
        self._path = fault_path(node_root)
        self._gpus = gpus
        self._poll = poll_seconds
        self._applied: dict[int, GpuErrorKind] = {}
        self._seen: tuple[int, int] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-faults", daemon=True)

    def start(self) -> FaultSwitch:
        self._path.unlink(missing_ok=True)  # a fresh demo starts healthy
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                self.apply()
            except Exception:  # the demo's fault switch must never take the daemon down
                logger.exception("demo: applying {} failed", self._path)

    def apply(self) -> None:
        """Read the file if it changed and set or heal each GPU's fault."""
        try:
            st = os.stat(self._path)
            seen: tuple[int, int] | None = (st.st_mtime_ns, st.st_ino)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        self._seen = seen
        wanted = read_fault(self._path) if seen is not None else {}
        for gpu in sorted(set(self._applied) | set(wanted)):
            if self._applied.get(gpu) != wanted.get(gpu):
                self._gpus.set_fault(gpu, wanted.get(gpu))
        if wanted != self._applied:
            logger.warning("demo: simulated NVML now fails for GPU(s) {}", ", ".join(
                f"{g} ({k.value})" for g, k in sorted(wanted.items())) or "none")
        self._applied = wanted


# --- the command ---------------------------------------------------------------------------------


def register(demo_sub: argparse._SubParsersAction, add_config: Callable[[argparse.ArgumentParser], None],
             demo_node: Callable[[argparse.Namespace], Any]) -> None:
    p = demo_sub.add_parser("fault", help="make the running demo node's simulated NVML fail",
                            description="Make every NVML read of one GPU, or of all, fail on the running demo "
                                        "node (as a driver error or a GPU fallen off the bus would); off heals.")
    add_config(p)
    p.add_argument("what", choices=["nvml"], help="what fails")
    p.add_argument("--gpu", required=True, metavar="N|all|off", help="a GPU index, all GPUs, or off")
    p.add_argument("--kind", choices=[GpuErrorKind.OTHER.value, GpuErrorKind.LOST.value],
                   default=GpuErrorKind.OTHER.value, help="other: NVML errors (default); lost: fell off the bus")
    p.set_defaults(func=lambda args: cmd_fault(args, demo_node(args)))


def cmd_fault(args: argparse.Namespace, node: Any) -> int:
    def fail(message: str) -> int:
        print(f"exporter-watchdog: {message}", file=sys.stderr)
        return 2

    if not node.exists:
        return fail(f"no demo node at {node.root} (start one with: exporter-watchdog serve --demo)")
    count = int(node.gpus)
    if args.gpu == "off":
        gpus: list[int] = []
    elif args.gpu == "all":
        gpus = list(range(count))
    elif args.gpu.isdigit() and int(args.gpu) < count:
        gpus = [int(args.gpu)]
    else:
        return fail(f"--gpu {args.gpu!r}: expected a GPU index 0-{count - 1}, all or off")
    write_fault(node.root, gpus, GpuErrorKind(args.kind))
    if gpus:
        print(f"NVML now fails ({args.kind}) for GPU(s) {','.join(map(str, gpus))} on the demo node")
    else:
        print("NVML works again for every GPU on the demo node")
    return 0
