"""Run `exporter-watchdog serve` as a real subprocess in a test, observe it, and always clean up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.waiting import free_port, wait_for

EXE = [sys.executable, "-m", "exporter_watchdog.cli"]
# Short cool-down and backoff so a test sees the demo daemon come back within seconds.
FAST_DEMO: dict[str, Any] = {"claim": {"gpus": 2, "cooldown_seconds": 1.0}, "server": {"backoff_initial_seconds": 0.5}}


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll `pred` until it returns something truthy; fail the test naming `what` at the deadline."""
    try:
        return wait_for(pred, timeout, what, interval)
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from None


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def group_members(pgid: int, *, session: bool = False) -> list[tuple[int, str]]:
    """(pid, state) of every process in process group `pgid` (or also session `pgid`), read from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid or (session and int(fields[3]) == pgid):
            members.append((int(entry), fields[0]))
    return members


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in process group (or session) `pgid`."""
    return any(state != "Z" for _, state in group_members(pgid, session=True))


class DaemonProc:
    """One daemon under test, with its own state dir, ports and config file."""

    def __init__(self, tmp: Path, config: dict[str, Any] | None = None, *, demo: bool = True,
                 args: Sequence[str] = (), env: dict[str, str] | None = None,
                 prefix: Sequence[str] = (), exe: Sequence[str] = tuple(EXE)) -> None:
        self.tmp = tmp
        self.metrics_port = free_port()
        self.server_port = free_port()
        cfg: dict[str, Any] = {
            "state_dir": str(tmp / "state"),
            "metrics": {"listen": f"127.0.0.1:{self.metrics_port}"},
            "server": {"port": self.server_port},
            "log": {"level": "DEBUG"},
        }
        for key, value in (config or {}).items():
            if isinstance(value, dict):
                cfg.setdefault(key, {}).update(value)
            else:
                cfg[key] = value
        self.config = cfg
        self.config_path = tmp / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.state_dir = Path(cfg["state_dir"])
        self.demo = demo
        self.args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.prefix = list(prefix)
        self.exe = list(exe)  # what runs `serve` (a test's launcher with fake GPUs, say)
        self.log_path = tmp / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def rewrite_config(self, **sections: dict[str, Any]) -> None:
        for key, value in sections.items():
            self.config.setdefault(key, {}).update(value)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, wait_state: str | None = "serving", timeout: float = 60.0) -> DaemonProc:
        cmd = [*self.prefix, *self.exe, "serve", "--config", str(self.config_path), *self.args]
        if self.demo:
            cmd.append("--demo")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        if wait_state:
            self.wait_state(wait_state, timeout)
        return self

    def status(self) -> dict[str, Any] | None:
        """GET /status, or None while the daemon does not answer."""
        try:
            response = httpx.get(f"{self.url}/status", timeout=2.0)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        doc: dict[str, Any] = response.json()
        return doc

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5.0).text

    def wait_status(self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            doc = self.status()
            return doc if doc is not None and pred(doc) else None

        try:
            result: dict[str, Any] = wait_until(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- daemon log (tail) ---\n{self.log()[-6000:]}") from None
        return result

    def wait_state(self, state: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_status(lambda d: d["state"] == state and (state != "serving" or d["server_ready"]),
                                timeout, f"state {state}")

    def cli(self, *args: str, timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.prefix, *EXE, *args, "--config", str(self.config_path)],
                                capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and result.returncode != 0:
            raise AssertionError(f"{args} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def demo_job(self, *args: str) -> str:
        out = self.cli("demo", "job", *args, check=True).stdout
        return out.split()[1]  # "job N running on ..."

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def server_record(self) -> dict[str, Any] | None:
        try:
            doc: dict[str, Any] = json.loads((self.state_dir / "server.json").read_text())
            return doc
        except (OSError, ValueError):
            return None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """SIGTERM and wait; SIGKILL the daemon's group and any server it left if it does not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.kill_left_server()
        self.proc = None

    def kill_left_server(self) -> None:
        record = self.server_record()
        if record and group_alive(int(record["pgid"])):
            try:
                os.killpg(int(record["pgid"]), signal.SIGKILL)
            except ProcessLookupError:
                pass
