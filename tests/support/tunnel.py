"""A demo-node daemon with the tunnel enabled, its connector played by tests/support/fake_cloudflared.py.

No real cloudflared can be installed here: the stand-in behaves like it at the process boundary
(token file, --metrics /ready and /metrics, unregister-then-drain on SIGTERM) and records its argv,
environment and signals. The demo server runs under tests/support/signal_recorder.py, so a test also
knows when the server was told to stop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.support.daemon import DaemonProc
from tests.support.waiting import free_port

SUPPORT = Path(__file__).resolve().parent
FAKE_CLOUDFLARED = [sys.executable, str(SUPPORT / "fake_cloudflared.py")]
TOKEN = "eyJhIjoiZmFrZS1hY2NvdW50IiwidCI6ImZha2UtdHVubmVsIiwicyI6InNlY3JldC10b2tlbi0xMjM0In0="
API_KEY = "sk-test-api-key-5678"
HOSTNAME = "llm.example.org"


def write_profiles(directory: Path, record: Path, peer: Path) -> None:
    """Two demo profiles (for `switch`) whose server runs under the signal recorder, watching the connector."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("demo", "demo-b"):
        command = ["{python}", str(SUPPORT / "signal_recorder.py"), str(record), "--peer-record", str(peer),
                   "--", "{python}", "-m", "exporter_watchdog.demo.llm", "--host", "{host}", "--port", "{port}",
                   "--model", "{served_model_name}"]
        doc = {"name": name, "model": "demo", "served_model_name": "demo", "command": command,
               "args": ["--ttft-ms", "0", "--itl-ms", "0"], "tensor_parallel": False,
               "startup_timeout_seconds": 30}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(doc))


class TunnelDaemon(DaemonProc):
    """DaemonProc plus the tunnel's files, the stand-in's record and the server's signal record."""

    def __init__(self, tmp: Path, *, grace: float = 5.0, drain: float = 1.0, key: bool = True,
                 tunnel: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
        self.token_file = tmp / "tunnel-token"
        self.token_file.write_text(TOKEN + "\n")
        self.key_file = tmp / "api-key"
        self.key_file.write_text(API_KEY + "\n")
        self.connector_record = tmp / "cloudflared.jsonl"
        self.server_record_path = tmp / "server-signals.jsonl"
        self.tunnel_metrics_port = free_port()
        write_profiles(tmp / "models", self.server_record_path, self.connector_record)
        server: dict[str, Any] = {"backoff_initial_seconds": 0.5, "models_dir": str(tmp / "models"),
                                  "profile": "demo"}
        if key:
            server["api_key_file"] = str(self.key_file)
        section: dict[str, Any] = {
            "enabled": True, "cloudflared": FAKE_CLOUDFLARED, "token_file": str(self.token_file),
            "hostname": HOSTNAME, "metrics": f"127.0.0.1:{self.tunnel_metrics_port}", "grace_seconds": grace,
        }
        section.update(tunnel or {})
        super().__init__(tmp, {"claim": {"gpus": 2, "cooldown_seconds": 1.0}, "server": server,
                               "tunnel": section},
                         env={"FAKE_CLOUDFLARED_RECORD": str(self.connector_record),
                              "FAKE_CLOUDFLARED_DRAIN_SECONDS": str(drain), **(env or {})})
        self.env["FAKE_CLOUDFLARED_ORIGIN"] = f"http://127.0.0.1:{self.server_port}/health"

    def connector_events(self, event: str | None = None) -> list[dict[str, Any]]:
        return _read(self.connector_record, event)

    def server_signals(self) -> list[dict[str, Any]]:
        return _read(self.server_record_path, "signal")

    def wait_tunnel(self, state: str, timeout: float = 30.0) -> dict[str, Any]:
        return self.wait_status(lambda d: d["tunnel"]["state"] == state, timeout, f"tunnel {state}")


def _read(path: Path, event: str | None) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue  # a line being written right now
        if event is None or doc.get("event") == event:
            out.append(doc)
    return out
