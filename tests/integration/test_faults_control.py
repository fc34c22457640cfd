"""Fault table, control socket: malformed and oversized requests, a crowd of clients, silent clients and
a peer of another uid, against a real `serve --demo` daemon. The loop must stay responsive (heartbeat
fresh, a job still makes it yield) and its memory and threads bounded."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from exporter_watchdog.act.control import MAX_HANDLERS, MAX_REQUEST, READ_DEADLINE, request
from tests.support.daemon import FAST_DEMO, DaemonProc, group_alive, wait_until
from tests.support.procstat import heartbeat_age, rss_kib, threads

# The loop wakes at least every slurm.rescan_seconds (5 s by default); a busy 2-core machine adds noise.
HEARTBEAT_BOUND = 15.0
NOBODY = 65534


def raw_exchange(path: Path, payload: bytes, timeout: float = 30.0) -> dict[str, Any]:
    """Send raw bytes on the control socket and parse the one-line answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(payload)
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def assert_yields_to_a_job(daemon: DaemonProc) -> None:
    """A job on a claimed GPU still stops the server: the loop is alive and acting."""
    doc = daemon.status()
    assert doc is not None and doc["state"] == "serving", doc
    pgid = doc["server_pid"]
    job = daemon.demo_job("--gpus", str(doc["claimed_gpus"][-1]), "--seconds", "0")
    daemon.wait_status(lambda d: d["server_pid"] is None, 30, "the server to yield to the job")
    wait_until(lambda: not group_alive(pgid), 10, "the server's group gone")
    daemon.cli("demo", "job", "--cancel", job, check=True)


def test_malformed_and_oversized_requests_are_answered_and_cost_nothing(daemon: DaemonProc) -> None:
    daemon.start()
    sock = daemon.state_dir / "control.sock"
    pid = daemon.proc.pid  # type: ignore[union-attr]
    rss_before = rss_kib(pid)

    for payload, expect in (
        (b"{not json\n", "bad request"),
        (b"[1, 2, 3]\n", "expected a JSON object"),
        (b"\xff\xfe\x00garbage\n", "bad request"),
        (b"\n", "bad request"),
        (b'{"cmd": "no-such-verb"}\n', "unknown command"),
        (b'{"cmd": "release", "gpus": "all"}\n', "release needs gpus"),
        (b'{"cmd": "switch", "profile": 7}\n', "switch needs a profile name"),
    ):
        answer = raw_exchange(sock, payload)
        assert answer["ok"] is False and expect in answer["error"], (payload, answer)

    # 1 MB, as one JSON line and as bytes with no newline at all: refused by size, not parsed.
    big_json = json.dumps({"cmd": "status", "pad": "x" * (1 << 20)}).encode() + b"\n"
    for payload in (big_json, b"y" * (1 << 20)):
        answer = raw_exchange(sock, payload)
        assert answer == {"ok": False, "error": f"bad request: larger than {MAX_REQUEST} bytes"}
    # Ten more in parallel: memory stays bounded (each connection buffers at most MAX_REQUEST bytes).
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: raw_exchange(sock, big_json), range(10)))
    assert all("larger than" in a["error"] for a in answers)

    # The daemon still works for honest clients, and its loop still yields.
    assert request(sock, {"cmd": "status"})["ok"] is True
    assert heartbeat_age(f"{daemon.url}/metrics") < HEARTBEAT_BOUND
    assert_yields_to_a_job(daemon)
    rss_after = rss_kib(pid)
    print(f"control bad requests: RSS {rss_before} KiB -> {rss_after} KiB")
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)


def test_a_crowd_and_silent_clients_do_not_pin_the_daemon(daemon: DaemonProc) -> None:
    daemon.start()
    sock = daemon.state_dir / "control.sock"
    pid = daemon.proc.pid  # type: ignore[union-attr]
    rss_before, threads_before = rss_kib(pid), threads(pid)

    # 100 concurrent clients: every one answered.
    with ThreadPoolExecutor(100) as pool:
        answers = list(pool.map(lambda _: request(sock, {"cmd": "status"}, timeout=60), range(100)))
    assert all(a["ok"] and a["status"]["state"] == "serving" for a in answers)
    threads_crowd = threads(pid)

    # 100 clients that connect and never send: more than the daemon serves at once.
    silent: list[socket.socket] = []
    try:
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(sock))
            silent.append(s)
        started = time.monotonic()
        # They fill every handler slot but pin no more than MAX_HANDLERS threads ...
        wait_until(lambda: threads(pid) >= threads_before + MAX_HANDLERS, 30, "the silent clients accepted")
        threads_silent = max(threads(pid) for _ in range(20))
        assert threads_silent <= threads_before + MAX_HANDLERS + 2, (threads_before, threads_silent)
        # ... and the loop goes on: heartbeat fresh, a job makes it yield.
        assert heartbeat_age(f"{daemon.url}/metrics") < HEARTBEAT_BOUND
        assert_yields_to_a_job(daemon)
        # The daemon drops each one at its read deadline; the backlog's turn comes after.
        for s in silent:
            s.settimeout(READ_DEADLINE * 4 + 60)
            assert s.recv(1) == b"", "a silent client must be dropped without an answer"
        dropped_after = time.monotonic() - started
    finally:
        for s in silent:
            s.close()
    answer = request(sock, {"cmd": "status"}, timeout=30)
    assert answer["ok"] is True
    wait_until(lambda: threads(pid) <= threads_before + 2, 30, "the control threads to end")
    rss_after = rss_kib(pid)
    print(f"control crowd: threads {threads_before} before, {threads_crowd} after 100 clients, "
          f"{threads_silent} with 100 silent clients held (bound {MAX_HANDLERS}); all silent ones dropped "
          f"after {dropped_after:.1f} s; RSS {rss_before} KiB -> {rss_after} KiB")
    assert rss_after - rss_before < 32 * 1024, (rss_before, rss_after)


@pytest.fixture
def open_socket_dir() -> Iterator[Path]:
    """A socket directory every user may traverse, so only the daemon's credential check stands."""
    path = Path(tempfile.mkdtemp(prefix="ew-ctl-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


PEER = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print(json.dumps({"connect_error": type(exc).__name__}))
    raise SystemExit(0)
s.sendall(b'{"cmd": "switch", "profile": "demo"}\\n')
data = b""
while not data.endswith(b"\\n"):
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print(data.decode() or json.dumps({"closed": True}))
"""


def as_nobody(sock: Path) -> dict[str, Any]:
    out = subprocess.run(["/usr/bin/python3", "-I", "-c", PEER, str(sock)], user=NOBODY, group=NOBODY,
                         extra_groups=[], capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    doc: dict[str, Any] = json.loads(out.stdout)
    return doc


def test_a_peer_of_another_uid_is_refused_by_its_credentials(tmp_path: Path, open_socket_dir: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("this test runs a client as another uid: it needs root (CI=true)")
        pytest.skip("needs root to run a client as another uid")
    sock = open_socket_dir / "control.sock"
    proc = DaemonProc(tmp_path, {**FAST_DEMO, "control": {"socket": str(sock)}})
    try:
        proc.start()
        assert sock.stat().st_mode & 0o777 == 0o600
        # First line of defence: the file mode.
        assert as_nobody(sock) == {"connect_error": "PermissionError"}
        # Open the file to everyone: the credentials check still refuses the peer.
        sock.chmod(0o666)
        answer = as_nobody(sock)
        assert answer == {"ok": False, "error": f"permission denied: uid {NOBODY} may not use this daemon"}
        wait_until(lambda: f"refused a client of uid {NOBODY}" in proc.log(), 10, "the refusal in the log")
        # Its request was not acted on; root (the Prolog's uid) and the daemon's own uid still are served.
        assert "switching to profile" not in proc.log()
        assert request(sock, {"cmd": "status"})["ok"] is True
        # A burst of refused peers is logged once per interval (10 s), not once each.
        for _ in range(5):
            assert as_nobody(sock)["ok"] is False
        assert proc.log().count(f"refused a client of uid {NOBODY}") <= 2
        assert heartbeat_age(f"{proc.url}/metrics") < HEARTBEAT_BOUND
    finally:
        proc.stop()
