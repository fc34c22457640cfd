"""The managed tunnel connector end to end on the demo node: real daemon, real demo server, real signals.

cloudflared cannot be installed here: tests/support/fake_cloudflared.py stands in for it at the
process boundary (token file, --metrics /ready and /metrics, unregister-then-drain on SIGTERM) and
records its argv, environment and signals; the demo server runs under tests/support/signal_recorder.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from exporter_watchdog.act.tunnel.launch import build_connector
from exporter_watchdog.config import load_config
from tests.support.daemon import EXE, group_alive, pid_alive, wait_until
from tests.support.tunnel import API_KEY, HOSTNAME, TOKEN, TunnelDaemon


@pytest.fixture
def tunnel_daemon(tmp_path: Path) -> Iterator[TunnelDaemon]:
    proc = TunnelDaemon(tmp_path)
    try:
        yield proc
    finally:
        proc.stop()
        for doc in proc.connector_events("start"):  # never leave a stand-in behind, even on failure
            if pid_alive(doc["pid"]):
                os.kill(doc["pid"], signal.SIGKILL)


def started(daemon: TunnelDaemon) -> TunnelDaemon:
    daemon.start()
    daemon.wait_tunnel("ready")
    return daemon


def test_connector_starts_after_the_server_is_healthy_and_never_sees_the_token_in_argv(
        tunnel_daemon: TunnelDaemon) -> None:
    doc = started(tunnel_daemon).status()
    assert doc is not None
    tunnel = doc["tunnel"]
    assert tunnel["enabled"] and tunnel["ready"] and tunnel["url"] == f"https://{HOSTNAME}"
    starts = tunnel_daemon.connector_events("start")
    assert len(starts) == 1 and tunnel["pid"] == starts[0]["pid"]
    # When the connector came up, the server already answered /health with 200.
    assert [e["status"] for e in tunnel_daemon.connector_events("origin")] == [200]
    argv = starts[0]["argv"]
    assert argv[:3] == ["tunnel", "--no-autoupdate", "--metrics"] and "run" in argv
    assert argv[argv.index("--token-file") + 1] == str(tunnel_daemon.token_file)
    assert argv[argv.index("--grace-period") + 1] == "5s"
    # The token reaches cloudflared through the file only.
    assert [e["token"] for e in tunnel_daemon.connector_events("credentials")] == [TOKEN]
    assert not any(TOKEN in a for a in argv)
    assert "TUNNEL_TOKEN" not in starts[0]["env"]
    with open(f"/proc/{tunnel['pid']}/cmdline", "rb") as fh:
        assert TOKEN.encode() not in fh.read()
    # Its own process group and session, recorded for orphan clean-up, marked in its environment.
    record = json.loads((tunnel_daemon.state_dir / "tunnel.json").read_text())
    assert record["pid"] == record["pgid"] == record["sid"] == tunnel["pid"]
    assert starts[0]["env"]["EXPORTER_WATCHDOG_TUNNEL"] == record["marker"]

    text = tunnel_daemon.metrics()
    assert "exporter_watchdog_tunnel_up 1.0" in text and "exporter_watchdog_tunnel_ready 1.0" in text
    assert "exporter_watchdog_tunnel_restarts_total 0.0" in text
    human = tunnel_daemon.cli("status", check=True).stdout
    assert f"tunnel:      ready, pid {tunnel['pid']}: https://{HOSTNAME}" in human
    checked = tunnel_daemon.cli("check")
    assert '"path": "^/v1/"' in checked.stdout and f"--token-file {tunnel_daemon.token_file}" in checked.stdout
    logs = [(tunnel_daemon.state_dir / name).read_text() for name in ("tunnel.log", "server.log")]
    outputs = [text, human, checked.stdout + checked.stderr, json.dumps(doc), tunnel_daemon.log(), *logs]
    for out in outputs:
        assert TOKEN not in out and API_KEY not in out
    # The API key still guards the API the tunnel publishes.
    url = f"http://127.0.0.1:{tunnel_daemon.server_port}/v1/models"
    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=5).status_code == 200


def test_yield_signals_the_connector_first_and_does_not_wait_for_its_drain(tmp_path: Path) -> None:
    daemon = TunnelDaemon(tmp_path, grace=10.0, drain=8.0)
    try:
        started(daemon)
        connector = daemon.connector_events("start")[0]["pid"]
        server = daemon.status()["server_pid"]  # type: ignore[index]
        job = daemon.demo_job("--gpus", "3", "--seconds", "0")
        doc = daemon.wait_status(lambda d: d["server_pid"] is None, 10, "the server to stop")
        assert doc["last_yield"]["jobs"] == [job] and not group_alive(server)
        connector_term = [e for e in daemon.connector_events("signal") if e["pid"] == connector]
        server_term = daemon.server_signals()
        assert [e["signal"] for e in connector_term] == ["SIGTERM"]
        assert server_term and server_term[0]["signal"] == "SIGTERM"
        # When the server got its SIGTERM, the connector's was already sent (pending or handled).
        assert server_term[0]["peer_pid"] == connector and server_term[0]["peer_signalled"] is True
        # The server is gone while the connector still drains (8 s): the job did not wait for it.
        assert pid_alive(connector) and not daemon.connector_events("exit")
        assert daemon.status()["tunnel"]["state"] == "draining"  # type: ignore[index]
        assert "exporter_watchdog_tunnel_up 1.0" in daemon.metrics()
        assert "exporter_watchdog_tunnel_ready 0.0" in daemon.metrics()
        # Only serving nodes hold a connector: none starts while the server is down.
        daemon.cli("demo", "job", "--cancel", job, check=True)
        daemon.wait_tunnel("ready", 40)
        assert len(daemon.connector_events("start")) == 2 and not pid_alive(connector)
    finally:
        daemon.stop()


def test_switch_drains_the_connector_before_the_server_stops(tunnel_daemon: TunnelDaemon) -> None:
    started(tunnel_daemon)
    connector = tunnel_daemon.connector_events("start")[0]["pid"]
    first_server = tunnel_daemon.status()["server_pid"]  # type: ignore[index]
    tunnel_daemon.cli("switch", "demo-b", check=True)
    doc = tunnel_daemon.wait_status(lambda d: d["profile"] == "demo-b" and d["server_ready"]
                                    and d["tunnel"]["state"] == "ready", 40, "serving demo-b with a tunnel")
    assert doc["server_pid"] != first_server
    term = [e for e in tunnel_daemon.connector_events("signal") if e["pid"] == connector]
    exits = [e for e in tunnel_daemon.connector_events("exit") if e["pid"] == connector]
    server_term = tunnel_daemon.server_signals()
    assert [e["signal"] for e in term] == ["SIGTERM"] and exits and exits[0]["drained"]
    assert exits[0]["mono"] - term[0]["mono"] >= 0.9  # it drained its in-flight time (1 s)
    assert server_term and exits[0]["mono"] < server_term[0]["mono"]  # and only then the server stopped


def test_a_reload_that_restarts_the_server_drains_the_connector_first(tunnel_daemon: TunnelDaemon) -> None:
    started(tunnel_daemon)
    connector = tunnel_daemon.connector_events("start")[0]["pid"]
    first_server = tunnel_daemon.status()["server_pid"]  # type: ignore[index]
    tunnel_daemon.rewrite_config(server={"extra_args": ["--max-tokens", "64"]})  # a new server command line
    tunnel_daemon.signal(signal.SIGHUP)
    doc = tunnel_daemon.wait_status(lambda d: d["server_pid"] not in (None, first_server) and d["server_ready"]
                                    and d["tunnel"]["state"] == "ready", 40, "the restarted server with a tunnel")
    assert "--max-tokens 64" in doc["server_argv"]
    exits = [e for e in tunnel_daemon.connector_events("exit") if e["pid"] == connector]
    server_term = tunnel_daemon.server_signals()
    assert exits and exits[0]["drained"] and server_term and exits[0]["mono"] < server_term[0]["mono"]


def test_a_killed_connector_is_restarted_while_the_server_keeps_serving(tunnel_daemon: TunnelDaemon) -> None:
    started(tunnel_daemon)
    server = tunnel_daemon.status()["server_pid"]  # type: ignore[index]
    first = tunnel_daemon.connector_events("start")[0]["pid"]
    os.kill(first, signal.SIGKILL)
    doc = tunnel_daemon.wait_status(lambda d: d["tunnel"]["ready"] and d["tunnel"]["pid"] not in (None, first), 30,
                                    "a new connector")
    assert doc["server_pid"] == server and doc["state"] == "serving" and doc["tunnel"]["restarts"] == 1
    assert tunnel_daemon.server_signals() == []  # the server was never touched
    assert "exporter_watchdog_tunnel_restarts_total 1.0" in tunnel_daemon.metrics()


def test_a_connector_that_keeps_failing_backs_off_and_the_server_stays(tmp_path: Path) -> None:
    daemon = TunnelDaemon(tmp_path, env={"FAKE_CLOUDFLARED_EXIT_AFTER": "0.3"})
    try:
        daemon.start()
        wait_until(lambda: len(daemon.connector_events("exit")) >= 3, 30, "three connector exits")
        exits = [e["mono"] for e in daemon.connector_events("start")]
        gaps = [b - a for a, b in zip(exits, exits[1:], strict=False)]
        assert gaps[1] > gaps[0]  # backoff grows (1 s, 2 s, ...) rather than a tight loop
        doc = daemon.status()
        assert doc is not None and doc["state"] == "serving" and doc["server_ready"]
        assert daemon.server_signals() == []
    finally:
        daemon.stop()


def test_shutdown_drains_the_connector_then_stops_the_server(tunnel_daemon: TunnelDaemon) -> None:
    started(tunnel_daemon)
    connector = tunnel_daemon.connector_events("start")[0]["pid"]
    tunnel_daemon.signal(signal.SIGTERM)
    assert tunnel_daemon.wait_exit(30) == 0
    exits = [e for e in tunnel_daemon.connector_events("exit") if e["pid"] == connector]
    server_term = tunnel_daemon.server_signals()
    assert exits and exits[0]["drained"] and server_term
    assert exits[0]["mono"] < server_term[0]["mono"]
    assert not (tunnel_daemon.state_dir / "tunnel.json").exists()


def kill_guards(record: Path) -> int:
    """SIGKILL the lifetime guard watching `record`, if the supervisor runs one: found by its command line."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read().split(b"\0")
        except OSError:
            continue
        if b"exporter_watchdog.act.guard" in argv and str(record).encode() in argv:
            os.kill(int(entry), signal.SIGKILL)
            killed += 1
    return killed


def test_a_connector_left_by_a_killed_daemon_is_stopped_at_the_next_start(tunnel_daemon: TunnelDaemon) -> None:
    started(tunnel_daemon)
    orphan = tunnel_daemon.connector_events("start")[0]["pid"]
    assert tunnel_daemon.proc is not None
    # The record is the last line of defence: take the lifetime guard (where there is one) out first.
    kill_guards(tunnel_daemon.state_dir / "tunnel.json")
    os.kill(tunnel_daemon.proc.pid, signal.SIGKILL)
    tunnel_daemon.proc.wait(10)
    tunnel_daemon.kill_left_server()
    assert pid_alive(orphan) and (tunnel_daemon.state_dir / "tunnel.json").exists()
    tunnel_daemon.start()
    wait_until(lambda: not pid_alive(orphan), 20, "the orphaned connector to be stopped")
    tunnel_daemon.wait_tunnel("ready")
    assert "tunnel connector left behind" in tunnel_daemon.log()


def test_a_connector_never_outlives_a_killed_daemon(tunnel_daemon: TunnelDaemon) -> None:
    started(tunnel_daemon)
    connector = tunnel_daemon.connector_events("start")[0]["pid"]
    assert tunnel_daemon.proc is not None
    os.kill(tunnel_daemon.proc.pid, signal.SIGKILL)
    tunnel_daemon.proc.wait(10)
    # The connector's guard (like the server's) stops it as soon as the daemon is gone.
    wait_until(lambda: not pid_alive(connector), 10, "the connector to be stopped by its guard")
    assert "the daemon is gone: stopping its tunnel connector" in tunnel_daemon.log()
    tunnel_daemon.start()
    tunnel_daemon.wait_tunnel("ready")
    assert tunnel_daemon.connector_events("start")[-1]["pid"] != connector


def test_enabled_without_an_api_key_exits_2_naming_both_keys(tmp_path: Path) -> None:
    daemon = TunnelDaemon(tmp_path, key=False)
    proc = subprocess.run([*EXE, "serve", "--demo", "--config", str(daemon.config_path)], capture_output=True,
                          text=True, timeout=60, env=daemon.env)
    assert proc.returncode == 2, proc.stderr
    assert "tunnel.enabled" in proc.stderr and "server.api_key_file" in proc.stderr
    assert "tunnel.allow_unauthenticated" in proc.stderr
    assert daemon.connector_events() == [] and not (daemon.state_dir / "server.json").exists()


def test_allow_unauthenticated_starts_without_a_key(tmp_path: Path) -> None:
    daemon = TunnelDaemon(tmp_path, key=False, tunnel={"allow_unauthenticated": True})
    try:
        started(daemon)
        url = f"http://127.0.0.1:{daemon.server_port}/v1/models"
        assert httpx.get(url, timeout=5).status_code == 200
    finally:
        daemon.stop()


def test_unreadable_token_file_exits_2_before_anything_starts(tmp_path: Path) -> None:
    daemon = TunnelDaemon(tmp_path, tunnel={"token_file": str(tmp_path / "missing-token")})
    proc = subprocess.run([*EXE, "serve", "--demo", "--config", str(daemon.config_path)], capture_output=True,
                          text=True, timeout=60, env=daemon.env)
    assert proc.returncode == 2 and "tunnel.token_file" in proc.stderr and "missing-token" in proc.stderr
    assert not (daemon.state_dir / "server.json").exists()


def test_locally_managed_tunnel_runs_with_the_generated_ingress(tmp_path: Path) -> None:
    creds = tmp_path / "6ff42ae2.json"
    creds.write_text('{"AccountTag": "a", "TunnelSecret": "s", "TunnelID": "6ff42ae2"}')
    user = tmp_path / "cloudflared.yml"
    user.write_text(f"tunnel: 6ff42ae2\ncredentials-file: {creds}\nmetrics: 0.0.0.0:2000\n"
                    "ingress:\n  - service: http://127.0.0.1:9999\n")
    daemon = TunnelDaemon(tmp_path, tunnel={"token_file": None, "config_file": str(user)})
    try:
        started(daemon)
        argv = daemon.connector_events("start")[0]["argv"]
        generated = daemon.state_dir / "tunnel-config.yml"
        assert argv[argv.index("--config") + 1] == str(generated) and argv[-1] == "run"
        assert "--token-file" not in argv
        import yaml

        doc = yaml.safe_load(generated.read_text())
        assert doc["tunnel"] == "6ff42ae2" and doc["credentials-file"] == str(creds) and "metrics" not in doc
        assert doc["ingress"] == [
            {"hostname": HOSTNAME, "path": "^/v1/", "service": f"http://127.0.0.1:{daemon.server_port}"},
            {"service": "http_status:404"},
        ]
        assert generated.stat().st_mode & 0o077 == 0
    finally:
        daemon.stop()


def test_generated_ingress_passes_a_real_cloudflareds_validation(tmp_path: Path) -> None:
    """Only where a real cloudflared is on PATH (none can be installed here; not required in CI)."""
    real = shutil.which("cloudflared")
    if real is None:
        pytest.skip("no cloudflared on PATH: the generated ingress is checked by a real one where it exists")
    creds = tmp_path / "6ff42ae2-765d-4adf-8112-31c55c1551ef.json"
    creds.write_text(json.dumps({"AccountTag": "a", "TunnelSecret": "c2VjcmV0", "TunnelID": creds.stem}))
    user = tmp_path / "cloudflared.yml"
    user.write_text(f"tunnel: {creds.stem}\ncredentials-file: {creds}\n")
    (tmp_path / "key").write_text("k\n")
    (tmp_path / "config.yaml").write_text(
        f"server: {{api_key_file: {tmp_path / 'key'}}}\n"
        f"tunnel: {{enabled: true, config_file: {user}, hostname: {HOSTNAME}}}\n")
    launch = build_connector(load_config(tmp_path / "config.yaml"), tmp_path / "state")
    assert launch.config_path is not None
    validate = subprocess.run([real, "tunnel", "ingress", "validate", "--config", str(launch.config_path)],
                              capture_output=True, text=True, timeout=60)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    for url, expected in ((f"https://{HOSTNAME}/v1/models", "http://127.0.0.1:8000"),
                          (f"https://{HOSTNAME}/metrics", "http_status:404")):
        rule = subprocess.run([real, "tunnel", "ingress", "rule", "--config", str(launch.config_path), url],
                              capture_output=True, text=True, timeout=60)
        assert rule.returncode == 0 and expected in rule.stdout, rule.stdout + rule.stderr


def test_the_connector_never_outlives_the_daemon(tunnel_daemon: TunnelDaemon) -> None:
    """The server's lifetime guard comes with the Supervisor, so the connector has one too."""
    started(tunnel_daemon)
    connector = tunnel_daemon.connector_events("start")[0]["pid"]
    assert tunnel_daemon.proc is not None
    os.kill(tunnel_daemon.proc.pid, signal.SIGKILL)  # no shutdown path runs: only the guard can act
    tunnel_daemon.proc.wait(10)
    wait_until(lambda: not pid_alive(connector), 10, "the connector to die with the daemon")
    # Told with SIGTERM first, so it unregistered from the edge rather than vanishing.
    assert [e["signal"] for e in tunnel_daemon.connector_events("signal") if e["pid"] == connector][:1] == ["SIGTERM"]
