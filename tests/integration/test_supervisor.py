"""The server supervisor and the health probe with real processes and a real loopback HTTP server."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exporter_watchdog.act import procs
from exporter_watchdog.act.health import HealthProbe
from exporter_watchdog.act.logfile import RotatingLog
from exporter_watchdog.act.procs import ProcInfo
from exporter_watchdog.act.supervisor import PollResult, ServerRecord, Supervisor

HELPER = Path(__file__).with_name("helpers_children.py")
REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
DEADLINE = 30.0  # generous: other people run tests on the same 2 cores


def wait_for(pred: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll pred until it returns something truthy; fail naming what we waited for."""
    deadline = time.monotonic() + timeout
    interval = 0.005
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)


def same_alive(info: ProcInfo) -> bool:
    """True while the very process info describes (same pid and start time) is alive."""
    now = procs.read_proc(info.pid)
    return now is not None and now.alive and now.start_ticks == info.start_ticks


def child_env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
    env.update(extra)
    return env


class Tracker:
    """Everything a test started, killed at teardown even when the test failed."""

    def __init__(self) -> None:
        self.supervisors: list[Supervisor] = []
        self.procs: list[ProcInfo] = []
        self.popens: list[subprocess.Popen[bytes]] = []

    def supervisor(self, tmp: Path, **kw: Any) -> Supervisor:
        kw.setdefault("term_timeout", 10.0)
        kw.setdefault("kill_timeout", 10.0)
        sup = Supervisor(tmp / "server.json", tmp / "server.log", **kw)
        self.supervisors.append(sup)
        return sup

    def ready(self, path: Path) -> dict[str, Any]:
        """Wait for a child's ready file and track every process it names."""
        wait_for(path.exists, f"ready file {path}")
        data: dict[str, Any] = json.loads(path.read_text())
        for pid in [data["leader"], *data.get("descendants", [])]:
            info = procs.read_proc(pid)
            assert info is not None, f"pid {pid} from {path} is not running"
            self.procs.append(info)
        return data

    def infos(self, data: dict[str, Any]) -> list[ProcInfo]:
        pids = {data["leader"], *data.get("descendants", [])}
        return [p for p in self.procs if p.pid in pids]

    def cleanup(self) -> None:
        for sup in self.supervisors:
            if sup.pid is not None or sup.poll().running:
                sup.stop(term_timeout=0.0)
        for info in self.procs:
            procs.signal_verified(info, signal.SIGKILL)
        for p in self.popens:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture
def tracker() -> Iterator[Tracker]:
    t = Tracker()
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.name in ("server-log", "health-probe")]

    wait_for(lambda: not leaked(), "supervisor/probe threads to finish", timeout=10.0)


def server_argv(mode: str, *args: str | Path) -> list[str]:
    return [PY, str(HELPER), mode, *map(str, args)]


# ----- start / stop ------------------------------------------------------------------------------


def test_well_behaved_server_stops_on_sigterm(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    pid = sup.start(server_argv("term-ok", ready), child_env())
    data = tracker.ready(ready)
    assert data["leader"] == pid == sup.pid
    assert sup.poll().running

    result = sup.stop()

    assert not result.escalated
    assert result.remaining == 0
    assert not any(same_alive(p) for p in tracker.infos(data))
    # Reaped, not left as a zombie: the pid is gone from /proc (or belongs to a newcomer).
    leader = tracker.infos(data)[0]
    now = procs.read_proc(pid)
    assert now is None or now.start_ticks != leader.start_ticks
    assert not sup.record_path.exists()
    assert sup.pid is None and sup.started_at is None
    assert sup.poll().running is False
    wait_for(lambda: "term-ok up" in sup.log_path.read_text(), "server output in the log")


def test_server_ignoring_sigterm_gets_sigkill(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    sup.start(server_argv("ignore-term", ready), child_env())
    data = tracker.ready(ready)

    result = sup.stop(term_timeout=0.3)

    assert result.escalated
    assert result.remaining == 0
    assert not any(same_alive(p) for p in tracker.infos(data))
    assert not sup.record_path.exists()


def test_grandchildren_in_other_groups_all_gone(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    pid = sup.start(server_argv("tree", ready), child_env())
    data = tracker.ready(ready)
    infos = tracker.infos(data)
    assert len(infos) == 7
    # The fixture is what it claims: one session, several process groups.
    assert {p.sid for p in infos} == {pid}
    assert len({p.pgid for p in infos}) > 1

    result = sup.stop(term_timeout=0.5)

    assert result.escalated  # some of them ignore SIGTERM
    assert result.remaining == 0
    assert [p.pid for p in infos if same_alive(p)] == []
    assert procs.live_members(pid, procs.list_processes()) == []


def test_graceful_shutdown_gets_one_sigterm(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready, out = tmp_path / "ready.json", tmp_path / "count"
    pid = sup.start(server_argv("count-term", ready, out), child_env())
    tracker.ready(ready)
    child = wait_for(
        lambda: [p for p in procs.live_members(pid, procs.list_processes()) if p.pgid != pid],
        "the child to move to its own group",
    )
    tracker.procs.extend(child)

    result = sup.stop()

    assert not result.escalated and result.remaining == 0
    # Both the leader (through its group) and the child in another group got exactly one.
    for who in ("leader", "child"):
        assert json.loads(Path(f"{out}.{who}").read_text()) == {"sigterms": 1}


def test_stop_without_server_is_a_noop(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    result = sup.stop()
    assert (result.escalated, result.remaining, result.duration) == (False, 0, 0.0)
    assert sup.poll().running is False


def test_start_twice_is_refused(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    sup.start(server_argv("term-ok", ready), child_env())
    tracker.ready(ready)
    with pytest.raises(RuntimeError, match="already running"):
        sup.start(server_argv("term-ok", tmp_path / "other.json"), child_env())
    assert sup.stop().remaining == 0


def test_environment_marker_session_and_record(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    workdir = tmp_path / "work"
    workdir.mkdir()
    pid = sup.start(server_argv("env", ready), child_env(CUDA_VISIBLE_DEVICES="2,3"), cwd=workdir)
    data = tracker.ready(ready)

    record = ServerRecord.from_json(sup.record_path.read_text(), sup.record_path)
    info = procs.read_proc(pid)
    assert info is not None
    assert (record.pid, record.pgid, record.sid, record.start_ticks) == (pid, pid, pid, info.start_ticks)
    assert (info.pgid, info.sid) == (pid, pid)
    assert record.argv == server_argv("env", ready)
    assert abs(record.started_at - time.time()) < 3600  # wall clock, not monotonic
    # Exactly the given environment plus the marker and the record's path: nothing leaks in from the
    # daemon's own.
    expected = {**child_env(CUDA_VISIBLE_DEVICES="2,3"), "EXPORTER_WATCHDOG_SERVER": record.marker,
                "EXPORTER_WATCHDOG_RECORD": str(sup.record_path)}
    # /proc/PID/environ: the environment as exec'd (Python adds LC_CTYPE to its own os.environ).
    assert procs.read_environ(pid) == expected
    assert data["cwd"] == str(workdir)
    assert sup.stop().remaining == 0


# ----- crashes -----------------------------------------------------------------------------------


def test_quick_exit_is_reported_once(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    sup.start(server_argv("exit", "3"), child_env())

    first = wait_for(lambda: (r := sup.poll()).exited and r, "the exit to be seen")

    assert (first.running, first.pid, first.exit_code) == (False, None, 3)
    again = sup.poll()
    assert (again.running, again.exited) == (False, False)
    assert sup.pid is None
    assert not sup.record_path.exists()
    wait_for(lambda: "exiting" in sup.log_path.read_text(), "output of the exited server")


def test_crash_leaving_a_worker_behind(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    pid = sup.start(server_argv("crash-leave-child", ready, "7"), child_env())
    data = tracker.ready(ready)
    assert sup.poll() == PollResult(running=True, pid=pid, exited=False, exit_code=None)
    (tmp_path / "ready.json.go").touch()

    crashed = wait_for(lambda: (r := sup.poll()).exited and r, "the crash to be seen")

    assert (crashed.exit_code, crashed.pid) == (7, None)
    assert crashed.running  # its worker is still alive
    assert sup.record_path.exists()  # still tracked until it is stopped
    result = sup.stop()
    assert result.remaining == 0
    assert not any(same_alive(p) for p in tracker.infos(data))
    assert not sup.record_path.exists()


def test_killed_leader_reports_the_signal(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready.json"
    sup.start(server_argv("term-ok", ready), child_env())
    data = tracker.ready(ready)
    assert procs.signal_verified(tracker.infos(data)[0], signal.SIGKILL)

    crashed = wait_for(lambda: (r := sup.poll()).exited and r, "the kill to be seen")

    assert crashed.exit_code == -signal.SIGKILL
    assert not crashed.running


# ----- orphans -----------------------------------------------------------------------------------


def start_owner(tmp_path: Path, tracker: Tracker, mode: str) -> tuple[Path, dict[str, Any]]:
    """Run a stand-in daemon that starts a server, wait until the server is up, SIGKILL the daemon."""
    record, ready = tmp_path / "server.json", tmp_path / "ready.json"
    owner = subprocess.Popen(
        [PY, str(HELPER), "owner", str(record), str(tmp_path / "server.log"), mode, str(ready)],
        env=child_env(),
        start_new_session=True,
    )
    tracker.popens.append(owner)
    data = tracker.ready(ready)
    wait_for(lambda: record.exists() and json.loads(record.read_text())["pid"] > 0, "the server record")
    owner.kill()
    owner.wait()
    assert all(same_alive(p) for p in tracker.infos(data)), "server died with its daemon"
    return record, data


def test_orphan_is_stopped_after_daemon_sigkill(tmp_path: Path, tracker: Tracker) -> None:
    record, data = start_owner(tmp_path, tracker, "tree")
    infos = tracker.infos(data)

    sup = tracker.supervisor(tmp_path, term_timeout=0.5)
    found = sup.cleanup_orphan()

    assert found == len(infos) == 7
    assert [p.pid for p in infos if same_alive(p)] == []
    assert not record.exists()
    assert sup.cleanup_orphan() == 0  # idempotent


def test_orphan_found_by_marker_when_leader_is_gone(tmp_path: Path, tracker: Tracker) -> None:
    record, data = start_owner(tmp_path, tracker, "tree")
    leader, *rest = tracker.infos(data)
    assert procs.signal_verified(leader, signal.SIGKILL)
    wait_for(lambda: not same_alive(leader), "the leader to die")

    sup = tracker.supervisor(tmp_path, term_timeout=0.5)
    found = sup.cleanup_orphan()

    assert found == len(rest) == 6
    assert [p.pid for p in rest if same_alive(p)] == []
    assert not record.exists()


def test_start_cleans_up_a_stale_orphan_first(tmp_path: Path, tracker: Tracker) -> None:
    _, data = start_owner(tmp_path, tracker, "term-ok")
    sup = tracker.supervisor(tmp_path)
    ready = tmp_path / "ready2.json"
    sup.start(server_argv("term-ok", ready), child_env())
    tracker.ready(ready)

    assert not any(same_alive(p) for p in tracker.infos(data))
    assert sup.stop().remaining == 0


def test_reused_pid_is_never_killed(tmp_path: Path, tracker: Tracker) -> None:
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)
    tracker.popens.append(bystander)
    info = wait_for(lambda: procs.read_proc(bystander.pid), "sleep in /proc")
    # A record that points at the bystander's pid, group and session, as after PID reuse.
    stale = ServerRecord(
        pid=bystander.pid,
        pgid=bystander.pid,
        sid=bystander.pid,
        start_ticks=info.start_ticks + 12345,
        marker="0123456789abcdef",
        argv=["vllm", "serve"],
        started_at=time.time() - 86400,
    )
    (tmp_path / "server.json").write_text(stale.to_json())
    sup = tracker.supervisor(tmp_path, term_timeout=0.2, kill_timeout=0.2)

    assert sup.cleanup_orphan() == 0
    assert bystander.poll() is None
    assert same_alive(info)
    assert not sup.record_path.exists()


def test_unreadable_record_is_dropped(tmp_path: Path, tracker: Tracker) -> None:
    (tmp_path / "server.json").write_text("{not json")
    sup = tracker.supervisor(tmp_path)
    assert sup.cleanup_orphan() == 0
    assert not sup.record_path.exists()
    with pytest.raises(ValueError, match=r"server\.json: key 'pid' must be an integer, got 'x'"):
        ServerRecord.from_json(json.dumps({"pid": "x"}), tmp_path / "server.json")


# ----- log ---------------------------------------------------------------------------------------


def test_server_log_is_bounded_and_rotates(tmp_path: Path, tracker: Tracker) -> None:
    limit = 64 * 1024
    sup = tracker.supervisor(tmp_path, log_max_bytes=limit)
    sup.start(server_argv("spam", str(5 * limit)), child_env())
    wait_for(lambda: sup.poll().exited, "the chatty server to finish")
    backup = tmp_path / "server.log.1"
    wait_for(lambda: "LAST LINE" in sup.log_path.read_text(), "the last line in the log")

    assert backup.exists()
    assert not (tmp_path / "server.log.2").exists()
    assert 0 < sup.log_path.stat().st_size <= limit
    assert 0 < backup.stat().st_size <= limit
    # The backup holds the lines right before the current file's: nothing lost at the seam.
    last_backup = backup.read_text().splitlines()[-1]
    first_current = sup.log_path.read_text().splitlines()[0]
    nums = [int(line.split()[1]) for line in (last_backup, first_current) if line.startswith("line ")]
    if len(nums) == 2:
        assert nums[1] == nums[0] + 1


def test_log_appends_across_starts(tmp_path: Path, tracker: Tracker) -> None:
    sup = tracker.supervisor(tmp_path)
    for code in ("4", "5"):
        sup.start(server_argv("exit", code), child_env())
        wait_for(lambda: sup.poll().exited, "the server to exit")
    text = wait_for(
        lambda: (t := sup.log_path.read_text()).count("exiting") == 2 and t, "both servers' output"
    )
    assert text.count("--- ") == 2  # one header per start


def test_log_survives_losing_its_file(tmp_path: Path) -> None:
    log = RotatingLog(tmp_path / "server.log", max_bytes=100)
    try:
        log.write(b"a" * 60)
        (tmp_path / "server.log").unlink()  # an operator cleaning up by hand
        log.write(b"b" * 60)  # would pass the bound: rotation finds no file to move
        log.write(b"c" * 30)
        assert (tmp_path / "server.log").read_bytes() == b"b" * 60 + b"c" * 30
        log.write(b"d" * 250)  # larger than the bound: only the newest bytes are kept
        assert (tmp_path / "server.log").read_bytes() == b"d" * 100
        assert (tmp_path / "server.log.1").read_bytes() == b"b" * 60 + b"c" * 30
    finally:
        log.close()


# ----- health probe ------------------------------------------------------------------------------


class HealthServer:
    """A loopback HTTP server whose /health answers `status`, or hangs while `hang` is set."""

    def __init__(self, port: int = 0, status: int = 503) -> None:
        self.status = status
        self.hang = threading.Event()
        self.release = threading.Event()
        self.in_flight = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.in_flight += 1
                try:
                    if outer.hang.is_set():
                        outer.release.wait(DEADLINE)
                    self.send_response(outer.status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                finally:
                    outer.in_flight -= 1

            def log_message(self, format: str, *args: Any) -> None:  # keep the test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/health"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="test-http", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(DEADLINE)


@pytest.fixture
def health_server() -> Iterator[HealthServer]:
    server = HealthServer()
    try:
        yield server
    finally:
        server.close()


def test_probe_follows_health(health_server: HealthServer) -> None:
    changes: list[bool] = []
    probe = HealthProbe(lambda: changes.append(probe.ready), interval=0.02, timeout=2.0)
    try:
        probe.watch(health_server.url)
        assert probe.ready is False
        health_server.status = 200
        wait_for(lambda: probe.ready, "ready after /health answers 200")
        health_server.status = 503
        wait_for(lambda: not probe.ready, "not ready after /health answers 503")
        health_server.status = 200
        wait_for(lambda: probe.ready, "ready again")

        probe.watch(None)
        assert probe.ready is False  # at once, not after the next probe
        wait_for(lambda: len(changes) == 4, "on_change for the stop")
        assert changes == [True, False, True, False]
    finally:
        probe.close()


def test_probe_keeps_trying_while_the_server_is_not_listening_yet() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    changed = threading.Event()
    probe = HealthProbe(changed.set, interval=0.02, timeout=1.0)
    server: HealthServer | None = None
    try:
        probe.watch(f"http://127.0.0.1:{port}/health")  # refused: a server still loading its model
        assert probe.ready is False
        server = HealthServer(port=port, status=200)
        wait_for(lambda: probe.ready, "ready once the server listens")
        assert changed.is_set()
    finally:
        probe.close()
        if server is not None:
            server.close()


def test_hung_server_never_blocks_the_caller(health_server: HealthServer) -> None:
    health_server.status = 200
    health_server.hang.set()
    probe = HealthProbe(lambda: None, interval=0.02, timeout=DEADLINE)
    try:
        probe.watch(health_server.url)
        wait_for(lambda: health_server.in_flight > 0, "the probe to be stuck in a request")

        # All of these return while the request is still hanging: the caller is never blocked.
        assert probe.ready is False
        probe.watch(None)
        probe.watch(health_server.url)
        assert health_server.in_flight > 0 and not health_server.release.is_set()

        health_server.hang.clear()
        health_server.release.set()
        wait_for(lambda: probe.ready, "ready once the server answers")
    finally:
        health_server.release.set()  # on failure too: close() would otherwise wait for the request
        probe.close()
