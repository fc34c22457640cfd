#!/usr/bin/env python3
"""Runs a command as its child and records the signals it gets, with monotonic timestamps.

    signal_recorder.py RECORD [--peer-record PATH] -- COMMAND...

Both sit in the same process group, so a supervisor's killpg reaches both: the recorder appends
{"event": "signal", "signal": "SIGTERM", "mono": ...} to RECORD, waits for the child and exits with
its status. Tests wrap the demo server in it to see when the server was told to stop.

With --peer-record (the record of tests/support/fake_cloudflared.py), it also notes whether that
peer had been signalled when this process got its signal: the peer keeps a signal pending until it
has recorded it, so "pending or recorded" cannot miss one that was sent earlier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _events(path: str) -> list[dict[str, object]]:
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def peer_state(path: str, signum: int) -> dict[str, object]:
    """Was the newest live peer (by its record) signalled already: pending first, then recorded."""
    starts = [e for e in _events(path) if e.get("event") == "start"]
    for start in reversed(starts):
        pid = int(str(start["pid"]))
        try:
            with open(f"/proc/{pid}/status") as fh:
                fields = dict(line.split(":", 1) for line in fh.read().splitlines() if ":" in line)
        except OSError:
            continue
        if fields.get("State", "").strip().startswith("Z"):
            continue
        bit = 1 << (signum - 1)
        pending = any(int(fields.get(k, "0").strip(), 16) & bit for k in ("ShdPnd", "SigPnd"))
        recorded = any(e.get("event") == "signal" and e.get("pid") == pid for e in _events(path))
        return {"peer_pid": pid, "peer_signalled": pending or recorded}
    return {"peer_pid": None, "peer_signalled": None}


def main(argv: list[str]) -> int:
    peer = None
    if len(argv) > 2 and argv[1] == "--peer-record":
        peer, argv = argv[2], [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--":
        print("usage: signal_recorder.py RECORD [--peer-record PATH] -- COMMAND...", file=sys.stderr)
        return 2
    path, command = argv[0], argv[2:]

    def note(signum: int, frame: object) -> None:
        doc: dict[str, object] = {"event": "signal", "signal": signal.Signals(signum).name, "pid": os.getpid(),
                                  "mono": time.monotonic(), "wall": time.time()}
        if peer is not None:
            doc.update(peer_state(peer, signum))
        with open(path, "a") as fh:
            fh.write(json.dumps(doc) + "\n")

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
    child = subprocess.Popen(command)
    while True:
        try:
            return child.wait()
        except InterruptedError:  # pragma: no cover - PEP 475 retries
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
