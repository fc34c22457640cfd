"""Child programs for the supervisor tests: `python helpers_children.py MODE ARGS...`.

Modes that stay up write a JSON "ready" file (atomically) once every process they make is set up,
so tests wait on that file instead of sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path


def _write_ready(path: str, data: dict[str, object]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _pause_forever() -> None:
    while True:
        signal.pause()


def _spawn(ignore_term: bool, new_group: bool, report_fd: int, grandchild: bool = False) -> int:
    """Fork a process that reports its pid (and its own child's, if any) on report_fd, then waits."""
    pid = os.fork()
    if pid:
        return pid
    try:
        if new_group:
            os.setpgid(0, 0)  # leaves the server's process group, stays in its session
        if ignore_term:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if grandchild:
            # One more level down, ignoring SIGTERM: only SIGKILL gets it.
            _spawn(ignore_term=True, new_group=False, report_fd=report_fd)
        os.write(report_fd, f"{os.getpid()}\n".encode())
        _pause_forever()
    finally:
        os._exit(0)


def tree(ready: str) -> None:
    """A leader with children and grandchildren: some in new process groups, some deaf to SIGTERM."""
    read_fd, write_fd = os.pipe()
    plan = [
        dict(ignore_term=False, new_group=False, grandchild=True),
        dict(ignore_term=False, new_group=True, grandchild=False),
        dict(ignore_term=True, new_group=True, grandchild=True),
        dict(ignore_term=True, new_group=False, grandchild=False),
    ]
    expected = sum(2 if p["grandchild"] else 1 for p in plan)
    for p in plan:
        _spawn(report_fd=write_fd, **p)
    os.close(write_fd)
    pids: list[int] = []
    with os.fdopen(read_fd, "rb") as fh:
        while len(pids) < expected:
            line = fh.readline()
            if not line:
                break
            pids.append(int(line))
    print(f"tree up: {pids}", flush=True)
    _write_ready(ready, {"leader": os.getpid(), "descendants": pids})
    _pause_forever()


def count_term(ready: str, out: str) -> None:
    """Shut down gracefully on SIGTERM (taking a while), recording how many SIGTERMs arrived."""
    own_group = os.fork() == 0  # the child moves to its own group, as worker pools sometimes do
    if own_group:
        os.setpgid(0, 0)
    got: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    if not own_group:
        _write_ready(ready, {"leader": os.getpid(), "descendants": []})
    while not got:
        signal.pause()
    deadline = time.monotonic() + 0.3  # the graceful part: a supervisor polls several times meanwhile
    while time.monotonic() < deadline:
        time.sleep(0.01)
    _write_ready(f"{out}.{'child' if own_group else 'leader'}", {"sigterms": len(got)})
    os._exit(0)


def main(argv: list[str]) -> None:
    mode, args = argv[0], argv[1:]
    if mode == "term-ok":
        print("term-ok up", flush=True)
        _write_ready(args[0], {"leader": os.getpid(), "descendants": []})
        _pause_forever()
    elif mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ignoring SIGTERM", flush=True)
        _write_ready(args[0], {"leader": os.getpid(), "descendants": []})
        _pause_forever()
    elif mode == "count-term":
        count_term(args[0], args[1])
    elif mode == "tree":
        tree(args[0])
    elif mode == "exit":
        print("exiting", flush=True)
        sys.exit(int(args[0]))
    elif mode == "crash-leave-child":
        # The leader dies and leaves a child behind, as a crashed server can leave its workers.
        read_fd, write_fd = os.pipe()
        _spawn(ignore_term=False, new_group=False, report_fd=write_fd)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as fh:
            child = int(fh.readline())
        _write_ready(args[0], {"leader": os.getpid(), "descendants": [child]})
        # Exit only once the test has seen the ready file, so it can watch the crash happen.
        go = Path(args[0] + ".go")
        while not go.exists():
            time.sleep(0.01)
        sys.exit(int(args[1]))
    elif mode == "spam":
        total, line_no, out = int(args[0]), 0, sys.stdout
        written = 0
        while written < total:
            line = f"line {line_no:08d} " + "x" * 50 + "\n"
            out.write(line)
            written += len(line)
            line_no += 1
        out.write(f"LAST LINE {line_no}\n")
        out.flush()
    elif mode == "env":
        _write_ready(args[0], {"leader": os.getpid(), "cwd": os.getcwd()})
        _pause_forever()
    elif mode == "owner":
        # Stands in for the daemon: starts a server through a Supervisor, then waits to be killed.
        from exporter_watchdog.act.supervisor import Supervisor

        record, log, server_mode, server_ready = args
        sup = Supervisor(Path(record), Path(log))
        sup.start([sys.executable, __file__, server_mode, server_ready], dict(os.environ))
        _pause_forever()
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
