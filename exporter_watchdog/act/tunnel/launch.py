"""The connector's command line, environment and (for a locally-managed tunnel) the ingress it runs with.

The token never appears here: cloudflared reads it from tunnel.token_file itself (`--token-file`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from exporter_watchdog.config import Config, ConfigError

# Variables that would override --token-file in cloudflared: the configured file must win.
DROPPED_ENV = ("TUNNEL_TOKEN", "TUNNEL_TOKEN_FILE")
API_PATH = "^/v1/"  # Go regexp, unanchored unless anchored: only the OpenAI API is published
INGRESS_FILE = "tunnel-config.yml"
# Keys of the user's cloudflared config the daemon sets itself.
OWNED_KEYS = ("ingress", "metrics", "url", "hello-world", "grace-period", "no-autoupdate")


@dataclass(frozen=True)
class ConnectorLaunch:
    """What the connector's supervisor runs, and where its readiness is read."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    ready_url: str
    config_path: Path | None  # the generated config of a locally-managed tunnel


def origin_url(config: Config) -> str:
    """The server as the connector on this host reaches it."""
    host = config.server.host
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


def ingress_rules(config: Config) -> list[dict[str, str]]:
    """Only /v1/ of the public hostname reaches the server; everything else gets 404 from the edge side."""
    rule: dict[str, str] = {}
    if config.tunnel.hostname:
        rule["hostname"] = config.tunnel.hostname
    rule.update({"path": API_PATH, "service": origin_url(config)})
    return [rule, {"service": "http_status:404"}]


def public_url(config: Config) -> str | None:
    return f"https://{config.tunnel.hostname}" if config.tunnel.hostname else None


def ready_url(config: Config) -> str:
    host, _, port = config.tunnel.metrics.rpartition(":")
    if host in ("0.0.0.0", "", "::", "[::]"):
        host = "127.0.0.1"
    return f"http://{host}:{port}/ready"


def _grace(seconds: float) -> str:
    return f"{seconds:g}s"  # a Go duration


def connector_argv(config: Config, config_path: Path | None) -> tuple[str, ...]:
    tunnel = config.tunnel
    argv = [*tunnel.cloudflared, "tunnel", "--no-autoupdate", "--metrics", tunnel.metrics,
            "--grace-period", _grace(tunnel.grace_seconds)]
    if config_path is not None:
        argv += ["--config", str(config_path), "run"]
    else:
        assert tunnel.token_file is not None
        argv += ["run", "--token-file", str(tunnel.token_file)]
    return tuple(argv)


def read_local_config(config: Config) -> dict[str, Any]:
    """The user's locally-managed tunnel config (tunnel id, credentials-file); ConfigError when unusable."""
    path = config.tunnel.config_file
    assert path is not None
    key = "tunnel.config_file"
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(config.source, key, str(path), f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(config.source, key, str(path), f"not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(config.source, key, str(path), "expected a cloudflared config (a mapping)")
    for needed in ("tunnel", "credentials-file"):
        if not isinstance(doc.get(needed), str) or not doc[needed]:
            raise ConfigError(config.source, key, str(path), f"the file has no {needed!r} (a locally-managed "
                              "tunnel needs its id and credentials-file)")
    return doc


def render_local_config(config: Config) -> str:
    """The user's config with the daemon's ingress: hostname + ^/v1/ to the server, then 404."""
    doc = {k: v for k, v in read_local_config(config).items() if k not in OWNED_KEYS}
    doc["ingress"] = ingress_rules(config)
    return "# Written by exporter-watchdog from tunnel.config_file at each connector start; edits are lost.\n" + \
        yaml.safe_dump(doc, sort_keys=False)


def check_files(config: Config) -> None:
    """The files the connector needs exist and are readable (serve and check call it): ConfigError if not."""
    tunnel = config.tunnel
    if not tunnel.enabled:
        return
    if tunnel.token_file is not None:
        try:
            with open(tunnel.token_file, "rb") as fh:
                empty = not fh.read().strip()
        except OSError as exc:
            raise ConfigError(config.source, "tunnel.token_file", str(tunnel.token_file),
                              f"cannot read: {exc.strerror}") from None
        if empty:
            raise ConfigError(config.source, "tunnel.token_file", str(tunnel.token_file), "the file is empty")
    if tunnel.config_file is not None:
        read_local_config(config)


def build_connector(config: Config, state_dir: Path, base_env: Mapping[str, str] | None = None) -> ConnectorLaunch:
    """The command line and environment; writes the locally-managed tunnel's config into state_dir."""
    config_path = None
    if config.tunnel.config_file is not None:
        config_path = state_dir / INGRESS_FILE
        text = render_local_config(config)
        state_dir.mkdir(parents=True, exist_ok=True)
        tmp = config_path.with_name(config_path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, config_path)
    env = {k: v for k, v in (os.environ if base_env is None else base_env).items() if k not in DROPPED_ENV}
    return ConnectorLaunch(argv=connector_argv(config, config_path), env=env, ready_url=ready_url(config),
                           config_path=config_path)
