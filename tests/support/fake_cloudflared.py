#!/usr/bin/env python3
"""A stand-in for cloudflared at the process boundary (no real cloudflared can be installed here).

Behaves as `cloudflared tunnel [--no-autoupdate] [--metrics ADDR] [--grace-period 30s] [--config FILE]
run [--token-file FILE | --token T]` (token also from $TUNNEL_TOKEN / $TUNNEL_TOKEN_FILE) does at the
process boundary:
- exits 1 when it has no credentials (no token, no config file with tunnel + credentials-file);
- serves on --metrics `/ready` (503 until "registered", then 200 with cloudflared's JSON body),
  `/healthcheck` and `/metrics` with `cloudflared_tunnel_ha_connections` (4 once registered);
- on SIGTERM/SIGINT unregisters at once (/ready -> 503, 0 connections), then drains: it stays up for
  min(--grace-period, $FAKE_CLOUDFLARED_DRAIN_SECONDS) (default: the whole grace period) and exits 0;
  a second signal ends the drain at once;
- appends JSON lines to $FAKE_CLOUDFLARED_RECORD: its argv, environment, the token it read (so a test
  can check it arrived), every signal and its exit, each with wall-clock and monotonic timestamps.
$FAKE_CLOUDFLARED_REGISTER_SECONDS delays registration (default 0.2 s);
$FAKE_CLOUDFLARED_EXIT_AFTER makes it exit 1 on its own after that many seconds (a crash);
$FAKE_CLOUDFLARED_ORIGIN: a URL it GETs once at start, recording the status (what the edge would meet).
Only the standard library: it runs under any python3.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def record(event: str, **fields: object) -> None:
    path = os.environ.get("FAKE_CLOUDFLARED_RECORD")
    if not path:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "wall": time.time(), "mono": time.monotonic(),
                       **fields})
    with open(path, "a") as fh:
        fh.write(line + "\n")


def probe(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def parse_duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)


class State:
    def __init__(self) -> None:
        self.connections = 0
        self.lock = threading.Lock()


def serve_metrics(addr: str, state: State) -> ThreadingHTTPServer:
    host, _, port = addr.rpartition(":")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            with state.lock:
                conns = state.connections
            if self.path == "/ready":
                code = 200 if conns > 0 else 503
                body = json.dumps({"status": code, "readyConnections": conns, "connectorId": "fake"}).encode()
            elif self.path == "/healthcheck":
                code, body = 200, b"OK\n"
            elif self.path == "/metrics":
                code = 200
                body = ("# HELP cloudflared_tunnel_ha_connections Number of active ha connections\n"
                        "# TYPE cloudflared_tunnel_ha_connections gauge\n"
                        f"cloudflared_tunnel_ha_connections {conns}\n").encode()
            else:
                code, body = 404, b"404 page not found\n"
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server's name
            pass

    server = ThreadingHTTPServer((host.strip("[]") or "127.0.0.1", int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


WATCHED = {signal.SIGTERM, signal.SIGINT}
POLL = 0.01  # how often it looks for a pending signal (a real cloudflared idles; so should this)


def next_signal(timeout: float | None) -> str | None:
    """Wait up to timeout for SIGTERM/SIGINT; None if none came.

    The signals are blocked, so one that was sent stays pending (visible in /proc/PID/status) until
    it has been recorded here: a test can always tell whether this process was signalled yet.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        pending = signal.sigpending() & WATCHED
        if pending:
            sig = min(pending)
            record("signal", signal=sig.name)
            signal.sigwait({sig})
            return sig.name
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(POLL)


def main(argv: list[str]) -> int:
    signal.pthread_sigmask(signal.SIG_BLOCK, WATCHED)  # before any thread starts: they inherit it
    record("start", argv=argv, env=dict(os.environ))
    if not argv or argv[0] != "tunnel":
        print(f"fake cloudflared: unsupported command {argv[:1]}", file=sys.stderr)
        return 2
    metrics, grace, token, config = None, 30.0, os.environ.get("TUNNEL_TOKEN"), None
    token_file = os.environ.get("TUNNEL_TOKEN_FILE")
    words = argv[1:]
    saw_run = False
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else None
        if word == "--metrics":
            metrics, i = value, i + 2
        elif word == "--grace-period":
            grace, i = parse_duration(value or "30s"), i + 2
        elif word == "--config":
            config, i = value, i + 2
        elif word == "--token-file":
            token_file, i = value, i + 2
        elif word == "--token":
            token, i = value, i + 2
        elif word == "--no-autoupdate":
            i += 1
        elif word == "run":
            saw_run, i = True, i + 1
        else:
            print(f"fake cloudflared: unknown argument {word!r}", file=sys.stderr)
            return 2
    if not saw_run:
        print("fake cloudflared: expected `tunnel ... run`", file=sys.stderr)
        return 2
    credentials = None
    if token is None and token_file:
        with open(token_file) as fh:
            token = fh.read().strip()
    if token:
        credentials = "token"
    elif config:
        with open(config) as fh:
            text = fh.read()
        if "tunnel:" in text and "credentials-file:" in text:
            credentials = "config"
    if credentials is None:
        print("ERR Provided Tunnel token is not valid / no credentials", file=sys.stderr)
        record("exit", code=1, why="no credentials")
        return 1
    record("credentials", kind=credentials, token=token)
    origin = os.environ.get("FAKE_CLOUDFLARED_ORIGIN")
    if origin:  # what a request through the tunnel would meet right now
        record("origin", url=origin, status=probe(origin))
    state = State()
    if metrics is None:
        metrics = "127.0.0.1:20241"
    server = serve_metrics(metrics, state)
    print(f"INF Starting metrics server on {metrics}/metrics", flush=True)

    register = float(os.environ.get("FAKE_CLOUDFLARED_REGISTER_SECONDS", "0.2"))
    got = next_signal(register)
    if got is None:
        with state.lock:
            state.connections = 4
        record("registered")
        print("INF Registered tunnel connection connIndex=0..3", flush=True)
        crash_after = os.environ.get("FAKE_CLOUDFLARED_EXIT_AFTER")
        got = next_signal(float(crash_after) if crash_after else None)
        if got is None:
            record("exit", code=1, why="crash")
            print("ERR connection lost", file=sys.stderr, flush=True)
            return 1
    with state.lock:
        state.connections = 0  # UnregisterConnection on every connection, at once
    record("unregistered")
    print(f"INF Initiating graceful shutdown due to signal {got} ...", flush=True)
    drain = min(grace, float(os.environ.get("FAKE_CLOUDFLARED_DRAIN_SECONDS", grace)))
    second = next_signal(drain)  # a second signal ends the drain at once
    server.shutdown()
    record("exit", code=0, drained=second is None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
