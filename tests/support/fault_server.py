"""A server for the fault tests, run by the daemon through a profile: `python fault_server.py --port P ...`.

It answers GET /health (200, or only while a given file exists), forks a child and a grandchild that calls setsid
(leaving the server's session and group, optionally scrubbing its environment so no marker is
left), can ignore SIGTERM, and writes a JSON file with every pid once all of them are up, so a test
waits on that file instead of sleeping. Standard library only.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import sys
import threading
import time


def _write_json(path: str, data: object) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    os.replace(tmp, path)


def _child(report_fd: int, setsid: bool, scrub: bool, ignore_term: bool) -> None:
    """The process tree below the server: report our pid, then wait to be killed."""
    if ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if setsid:
        os.setsid()
    os.write(report_fd, f"{'S' if setsid else 'C'}{os.getpid()}\n".encode())
    if scrub:
        # A new program without the server's environment: only a cgroup still knows it is ours.
        os.execve("/bin/sleep", ["sleep", "3600"], {})
    while True:
        signal.pause()


def _fork(report_fd: int, **kw: bool) -> None:
    if os.fork() == 0:
        try:
            _child(report_fd, **kw)
        finally:
            os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pids-file", required=True)
    parser.add_argument("--ready-when", help="answer /health 200 only while this file exists")
    parser.add_argument("--ignore-term", action="store_true", help="the whole tree ignores SIGTERM")
    parser.add_argument("--setsid-child", action="store_true", help="a grandchild that calls setsid")
    parser.add_argument("--scrub-env", action="store_true", help="the setsid grandchild drops the environment")
    parser.add_argument("--term-file", help="append the time of each SIGTERM here")
    args = parser.parse_args()

    def on_term(signum: int, frame: object) -> None:
        if args.term_file:
            with open(args.term_file, "a") as fh:
                fh.write(f"{time.time()}\n")
        if not args.ignore_term:
            os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    read_fd, write_fd = os.pipe()
    _fork(write_fd, setsid=False, scrub=False, ignore_term=args.ignore_term)
    expected = 1
    if args.setsid_child:
        _fork(write_fd, setsid=True, scrub=args.scrub_env, ignore_term=args.ignore_term)
        expected += 1
    os.close(write_fd)
    reports: list[str] = []
    buffer = b""
    while len(reports) < expected:
        buffer += os.read(read_fd, 4096)
        *lines, buffer = buffer.split(b"\n")
        reports.extend(x.decode() for x in lines if x)
    os.close(read_fd)
    # The child that stayed first, the one that left the session last.
    pids = [int(r[1:]) for r in sorted(reports)]

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            ok = self.path == "/health" and (args.ready_when is None or os.path.exists(args.ready_when))
            self.send_response(200 if ok else 503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a: object) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", args.port), Health)
    _write_json(args.pids_file, {"server": os.getpid(), "children": pids,
                                 "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")})
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main())
