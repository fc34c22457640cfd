"""Load on a /metrics endpoint: N scrapers in a loop on keep-alive connections, plus M idle connections."""

from __future__ import annotations

import http.client
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class ScrapeResults:
    """Every scrape's status (0: no answer, the exception's text in `errors`) and latency in seconds."""

    statuses: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


class ScrapeLoad:
    """Start with start(), end with stop(); `rounds` scrapes per scraper (0: until stop())."""

    def __init__(self, host: str, port: int, *, scrapers: int = 200, idle: int = 50, rounds: int = 0,
                 timeout: float = 120.0) -> None:
        self.host, self.port = host, port
        self.scrapers, self.idle, self.rounds, self.timeout = scrapers, idle, rounds, timeout
        self.results = ScrapeResults()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._idle: list[socket.socket] = []
        self._go = threading.Barrier(scrapers + 1)

    def open_idle(self) -> None:
        """Idle connections: half never send a byte, half sent one scrape and keep the connection open."""
        for i in range(self.idle):
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                sock.recv(65536)
            self._idle.append(sock)

    def idle_still_open(self) -> int:
        """How many of the idle connections the server has not closed."""
        alive = 0
        for sock in self._idle:
            sock.setblocking(False)
            try:
                alive += sock.recv(1, socket.MSG_PEEK) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
            finally:
                sock.setblocking(True)
        return alive

    def start(self) -> ScrapeLoad:
        self.open_idle()
        for i in range(self.scrapers):
            thread = threading.Thread(target=self._scrape, name=f"scraper-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._go.wait()  # every scraper ready: they start at once
        return self

    def wait(self, timeout: float) -> None:
        """Wait for the scrapers to finish their rounds."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def stop(self) -> ScrapeResults:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.timeout)
        for sock in self._idle:
            sock.close()
        return self.results

    def _scrape(self) -> None:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        done = 0
        try:
            self._go.wait()
            while not self._stop.is_set() and (not self.rounds or done < self.rounds):
                started = time.monotonic()
                try:
                    conn.request("GET", "/metrics")
                    response = conn.getresponse()
                    response.read()
                    status, error = response.status, None
                except (OSError, http.client.HTTPException) as exc:
                    status, error = 0, f"{type(exc).__name__}: {exc}"
                    conn.close()  # reconnect on the next round
                took = time.monotonic() - started
                with self._lock:
                    self.results.statuses.append(status)
                    self.results.latencies.append(took)
                    if error:
                        self.results.errors.append(error)
                done += 1
        finally:
            conn.close()


def main() -> int:
    """Run the load in a process of its own (so it does not share a GIL with whoever measures):
    prints "ready" once every scraper runs, stops when stdin closes, then prints the results as JSON."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--scrapers", type=int, default=200)
    parser.add_argument("--idle", type=int, default=50)
    args = parser.parse_args()
    load = ScrapeLoad(args.host, args.port, scrapers=args.scrapers, idle=args.idle).start()
    print("ready", flush=True)
    sys.stdin.read()
    idle_open = load.idle_still_open()
    results = load.stop()
    print(json.dumps({"statuses": results.statuses, "latencies": results.latencies, "errors": results.errors[:20],
                      "idle_open": idle_open}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
