"""Real Prometheus and Alertmanager on free loopback ports, and a loopback stand-in for ntfy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import yaml

from tests.support.waiting import free_port, wait_for  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = REPO / "prometheus"
# Debian names the Alertmanager binary prometheus-alertmanager; upstream tarballs call it alertmanager.
BINARIES: dict[str, tuple[str, ...]] = {
    "prometheus": ("prometheus",),
    "promtool": ("promtool",),
    "alertmanager": ("prometheus-alertmanager", "alertmanager"),
    "amtool": ("amtool",),
}
PACKAGES = "prometheus prometheus-alertmanager"
# Generous: other people run tests on the same 2 cores.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
T = TypeVar("T")


def in_ci() -> bool:
    """Whether the run is CI, where a missing service fails the tests instead of skipping them."""
    return os.environ.get("CI", "").lower() == "true"


def find_binary(name: str) -> str | None:
    """The path of a Prometheus-family program, under any of its packaged names."""
    for candidate in BINARIES[name]:
        path = shutil.which(candidate)
        if path:
            return path
    return None


def require_binaries(*names: str) -> dict[str, str]:
    """The paths of the named programs; fail the test in CI and skip it elsewhere when one is missing."""
    found = {name: find_binary(name) for name in names}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        message = f"missing {', '.join(missing)}; install: apt-get install {PACKAGES}"
        if in_ci():
            pytest.fail(f"required when CI=true: {message}", pytrace=False)
        pytest.skip(message)
    return {name: path for name, path in found.items() if path is not None}




# --- ntfy stand-in ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the ntfy stand-in received it."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lower-cased
    body: bytes
    received_at: float  # wall clock

    def json(self) -> Any:
        return json.loads(self.body)


class NtfyStandIn:
    """A loopback HTTP server that records every request and answers like ntfy does (200, JSON)."""

    def __init__(self) -> None:
        self._requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="ntfy-stand-in", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> NtfyStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=STOP_TIMEOUT)

    def __enter__(self) -> NtfyStandIn:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def wait_for(self, match: Callable[[RecordedRequest], bool], timeout: float, what: str) -> RecordedRequest:
        """The first recorded request that matches, waiting for it up to `timeout` seconds."""
        return wait_for(lambda: next((r for r in self.requests() if match(r)), None), timeout, what)

    def _record(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        record = self._record

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                parts = urlsplit(self.path)
                record(RecordedRequest(
                    method=self.command,
                    path=parts.path,
                    query=parse_qs(parts.query, keep_blank_values=True),
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                    received_at=time.time(),
                ))
                answer = json.dumps({"id": "standin", "event": "message", "topic": parts.path.strip("/")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            do_POST = _handle  # noqa: N815 - http.server's naming
            do_PUT = _handle  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature of the base
                pass

        return Handler


# --- Prometheus and Alertmanager -------------------------------------------------------------------


class _Service:
    """A Prometheus-family server on 127.0.0.1 in its own process group, its log in the work dir."""

    name = "service"
    ready_path = "/-/ready"

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self._client = httpx.Client(timeout=10.0)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def start(self) -> None:
        """Start on a free port (retrying when another process took it first) and wait until ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):
            self.port = free_port()
            with self.log_path.open("ab") as log:
                self.proc = subprocess.Popen(
                    self.argv(self.port), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.workdir, start_new_session=True,
                )
            try:
                wait_for(self._ready, START_TIMEOUT, f"{self.name} ready on {self.url}")
                return
            except TimeoutError:
                exited = self.proc.poll() is not None
                self.stop()
                if not (exited and "address already in use" in self.log_tail().lower()):
                    raise RuntimeError(f"{self.name} did not start; log:\n{self.log_tail()}") from None
        raise RuntimeError(f"{self.name} found no free port; log:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise TimeoutError(f"{self.name} exited")
        try:
            return self._client.get(self.url + self.ready_path).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """TERM the process group, KILL it at the deadline."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def close(self) -> None:
        self.stop()
        self._client.close()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def get_json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        response = self._client.get(self.url + path, params=params)
        response.raise_for_status()
        return response.json()


class Prometheus(_Service):
    """`prometheus` with the given config file, its TSDB in the work dir."""

    name = "prometheus"

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        super().__init__(binary, workdir)
        self.config = config

    def argv(self, port: int) -> list[str]:
        return [
            self.binary, f"--config.file={self.config}", f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle", "--log.level=warn",
        ]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query (vector or scalar as a one-element list)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._api("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """The series of a range query."""
        data = self._api("/api/v1/query_range", {"query": expr, "start": start, "end": end, "step": step})
        return list(data["result"])

    def wait_for_query(
        self, expr: str, timeout: float, match: Callable[[list[dict[str, Any]]], bool] = bool,
    ) -> list[dict[str, Any]]:
        """Poll an instant query until its result matches (by default: is not empty)."""
        def check() -> list[dict[str, Any]] | None:
            result = self.query(expr)
            return result if match(result) and result else None
        return wait_for(check, timeout, f"query {expr!r}")

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's label_values(match, label) lists."""
        return list(self._api(f"/api/v1/label/{label}/values", {"match[]": match}))

    def targets(self) -> list[dict[str, Any]]:
        return list(self._api("/api/v1/targets", {"state": "active"})["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        return list(self._api("/api/v1/rules", {})["groups"])

    def _api(self, path: str, params: Mapping[str, Any]) -> Any:
        response = self._client.get(self.url + path, params=params)
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"{path} {dict(params)}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]


class Alertmanager(_Service):
    """`prometheus-alertmanager` with the given config file, no cluster port."""

    name = "alertmanager"

    def __init__(self, binary: str, config: Path, workdir: Path) -> None:
        super().__init__(binary, workdir)
        self.config = config

    def argv(self, port: int) -> list[str]:
        return [
            self.binary, f"--config.file={self.config}", f"--storage.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=warn",
        ]

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.get_json("/api/v2/alerts"))


def run_tool(argv: Sequence[str], cwd: Path | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run promtool or amtool; the result carries its combined output for assertion messages."""
    return subprocess.run(
        list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=timeout, check=False,
    )


# --- test copies of the shipped configs ------------------------------------------------------------


def write_prometheus_config(
    workdir: Path, target_groups: list[dict[str, Any]], alertmanager: str | None = None, interval: str = "1s",
) -> Path:
    """The shipped prometheus.yml with short intervals, the shipped rules, and the given file_sd targets."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    config["alerting"]["alertmanagers"] = (
        [{"static_configs": [{"targets": [alertmanager]}]}] if alertmanager else []
    )
    for job in config["scrape_configs"]:
        job.pop("scrape_timeout", None)
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = interval
    (workdir / "targets").mkdir(parents=True, exist_ok=True)
    (workdir / "targets" / "test.json").write_text(json.dumps(target_groups))
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_alertmanager_config(workdir: Path, ntfy_url: str, token: str) -> Path:
    """The shipped alertmanager.yml posting to `ntfy_url`, with no grouping delay and the token file beside it."""
    config = yaml.safe_load((PROMETHEUS_DIR / "alertmanager.yml").read_text())
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        if "group_wait" in route or route is config["route"]:
            route["group_wait"] = "0s"
        route["group_interval"] = "1s"
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            assert hook["url"].startswith("https://ntfy.sh/"), hook["url"]
            hook["url"] = ntfy_url + hook["url"][len("https://ntfy.sh"):]
    workdir.mkdir(parents=True, exist_ok=True)
    # credentials_file stays relative, as shipped: it must resolve against the config's folder.
    (workdir / "ntfy-token").write_text(token + "\n")
    path = workdir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
