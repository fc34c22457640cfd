"""The tunnel: config validation, the connector's command line, environment and ingress, its status and metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from exporter_watchdog.act.tunnel.launch import build_connector, check_files, ingress_rules, ready_url
from exporter_watchdog.config import ConfigError, load_config
from exporter_watchdog.core.model import Owner, Phase, Snapshot
from exporter_watchdog.metrics.daemon import SnapshotCollector
from exporter_watchdog.status import render_status, status_dict

TOKEN = "eyJhIjoic2VjcmV0LXRva2VuIn0="


def config_file(tmp_path: Path, tunnel: dict[str, object], key: bool = True, **server: object) -> Path:
    doc: dict[str, object] = {"tunnel": {"enabled": True, **tunnel}, "state_dir": str(tmp_path / "state")}
    srv: dict[str, object] = dict(server)
    if key:
        (tmp_path / "key").write_text("sk-key\n")
        srv["api_key_file"] = str(tmp_path / "key")
    doc["server"] = srv
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def token(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


def test_defaults_are_off_and_loopback() -> None:
    tunnel = load_config(None).tunnel
    assert not tunnel.enabled and tunnel.metrics == "127.0.0.1:20241" and tunnel.grace_seconds == 30.0
    assert tunnel.cloudflared == ("cloudflared",) and not tunnel.allow_unauthenticated


def test_enabled_without_an_api_key_names_both_keys(tmp_path: Path) -> None:
    path = config_file(tmp_path, {"token_file": token(tmp_path)}, key=False)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text and "tunnel.enabled = True" in text and "server.api_key_file" in text
    assert "tunnel.allow_unauthenticated" in text
    config = load_config(config_file(tmp_path, {"token_file": token(tmp_path), "allow_unauthenticated": True},
                                     key=False))
    assert config.tunnel.enabled and config.server.api_key_file is None


@pytest.mark.parametrize(
    ("tunnel", "key", "problem"),
    [
        ({}, "tunnel.token_file", "set tunnel.token_file"),
        ({"token_file": "/t", "config_file": "/c"}, "tunnel.config_file", "not both"),
        ({"config_file": "/c"}, "tunnel.hostname", "needs the public hostname"),
        ({"token_file": "/t", "metrics": "127.0.0.1:0"}, "tunnel.metrics", "fixed port"),
        ({"token_file": "/t", "metrics": "nowhere"}, "tunnel.metrics", "HOST:PORT"),
        ({"token_file": "/t", "hostname": "https://llm.example.org/"}, "tunnel.hostname", "bare host name"),
        ({"token_file": "/t", "grace_seconds": -1}, "tunnel.grace_seconds", ">= 0"),
        ({"token_file": "/t", "cloudflared": []}, "tunnel.cloudflared", "empty"),
        ({"token_file": "/t", "token": "abc"}, "tunnel.token", "unknown key"),
    ],
)
def test_bad_tunnel_settings_name_the_key(tmp_path: Path, tunnel: dict[str, object], key: str, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config_file(tmp_path, tunnel))
    assert err.value.key == key and problem in str(err.value)


def test_token_file_must_be_readable_and_not_empty(tmp_path: Path) -> None:
    missing = load_config(config_file(tmp_path, {"token_file": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="tunnel.token_file.*cannot read"):
        check_files(missing)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="the file is empty"):
        check_files(load_config(config_file(tmp_path, {"token_file": str(tmp_path / "empty")})))
    check_files(load_config(config_file(tmp_path, {"token_file": token(tmp_path)})))


def test_token_tunnel_command_line_has_the_file_never_the_token(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, {"token_file": token(tmp_path), "grace_seconds": 2.5,
                                                "cloudflared": "/opt/cf/cloudflared --loglevel info"}))
    launch = build_connector(config, tmp_path, base_env={"PATH": "/bin", "TUNNEL_TOKEN": "x", "HOME": "/root"})
    assert launch.argv == ("/opt/cf/cloudflared", "--loglevel", "info", "tunnel", "--no-autoupdate", "--metrics",
                           "127.0.0.1:20241", "--grace-period", "2.5s", "run", "--token-file", str(tmp_path / "token"))
    assert TOKEN not in " ".join(launch.argv)
    assert launch.env == {"PATH": "/bin", "HOME": "/root"}  # a TUNNEL_TOKEN in the daemon's env would win
    assert launch.ready_url == "http://127.0.0.1:20241/ready" and launch.config_path is None


def test_locally_managed_tunnel_gets_only_the_api_published(tmp_path: Path) -> None:
    user = tmp_path / "cf.yml"
    user.write_text("tunnel: 6ff42ae2\ncredentials-file: /etc/cloudflared/6ff42ae2.json\nprotocol: http2\n"
                    "metrics: 0.0.0.0:2000\ningress:\n  - service: http://127.0.0.1:8000\n")
    config = load_config(config_file(tmp_path, {"config_file": str(user), "hostname": "llm.example.org",
                                                "metrics": "0.0.0.0:20300"}, host="0.0.0.0", port=8123))
    launch = build_connector(config, tmp_path / "state", base_env={})
    assert launch.argv[-3:] == ("--config", str(tmp_path / "state" / "tunnel-config.yml"), "run")
    doc = yaml.safe_load((tmp_path / "state" / "tunnel-config.yml").read_text())
    assert doc == {"tunnel": "6ff42ae2", "credentials-file": "/etc/cloudflared/6ff42ae2.json", "protocol": "http2",
                   "ingress": [{"hostname": "llm.example.org", "path": "^/v1/", "service": "http://127.0.0.1:8123"},
                               {"service": "http_status:404"}]}
    assert launch.ready_url == "http://127.0.0.1:20300/ready"  # all interfaces are probed on loopback


def test_locally_managed_config_without_credentials_is_refused(tmp_path: Path) -> None:
    user = tmp_path / "cf.yml"
    user.write_text("tunnel: 6ff42ae2\n")
    config = load_config(config_file(tmp_path, {"config_file": str(user), "hostname": "llm.example.org"}))
    with pytest.raises(ConfigError, match="credentials-file"):
        check_files(config)


def test_ingress_rule_for_ipv6_and_no_hostname(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, {"token_file": token(tmp_path), "metrics": "[::1]:20241"},
                                     host="::"))
    assert ingress_rules(config) == [{"path": "^/v1/", "service": "http://[::1]:8000"},
                                     {"service": "http_status:404"}]
    assert ready_url(config) == "http://[::1]:20241/ready"


def snap(**kw: object) -> Snapshot:
    base: dict[str, object] = dict(node="n1", phase=Phase.SERVING, node_gpus=2, claimed_gpus=(1,),
                                   gpu_owner={0: Owner.FREE, 1: Owner.WATCHDOG}, jobs=(), profile="demo",
                                   model="demo", server_pid=10, server_ready=True)
    base.update(kw)
    return Snapshot(**base)  # type: ignore[arg-type]


def test_status_shows_the_tunnel_state_and_public_url() -> None:
    doc = status_dict(snap(tunnel_enabled=True, tunnel_state="ready", tunnel_pid=77, tunnel_ready=True,
                           tunnel_url="https://llm.example.org", tunnel_restarts=2), 0.0)
    assert doc["tunnel"] == {"enabled": True, "state": "ready", "pid": 77, "ready": True,
                             "url": "https://llm.example.org", "restarts": 2}
    assert "tunnel:      ready, pid 77, 2 restart(s): https://llm.example.org" in render_status(doc)
    off = status_dict(snap(), 0.0)
    assert off["tunnel"]["state"] == "disabled" and "tunnel:" not in render_status(off)


def test_tunnel_families_only_when_enabled() -> None:
    registry = CollectorRegistry()
    current = [snap()]
    registry.register(SnapshotCollector(lambda: current[0]))
    assert registry.get_sample_value("exporter_watchdog_tunnel_up") is None
    current[0] = snap(tunnel_enabled=True, tunnel_state="connecting", tunnel_pid=5, tunnel_restarts=3)
    assert registry.get_sample_value("exporter_watchdog_tunnel_up") == 1
    assert registry.get_sample_value("exporter_watchdog_tunnel_ready") == 0
    assert registry.get_sample_value("exporter_watchdog_tunnel_restarts_total") == 3
    current[0] = snap(tunnel_enabled=True, tunnel_state="stopped")
    assert registry.get_sample_value("exporter_watchdog_tunnel_up") == 0
