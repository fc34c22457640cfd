#!/usr/bin/env python3
"""Yield latency on the demo node with and without the tunnel connector.

Runs `exporter-watchdog serve --demo` without a tunnel and with one (its connector played by
tests/support/fake_cloudflared.py: no real cloudflared can be installed here), submits jobs on a
claimed GPU and times each from just before the job directory is made to the moment the server's
process exits (a pidfd turns readable). With the tunnel, every job lands while the connector runs,
so each yield also sends the connector its SIGTERM first. Rounds alternate the two modes, so a busy
machine affects both alike. Prints p50, p99, mean and the differences.

    .venv/bin/python benchmarks/tunnel_yield_latency.py [--jobs 50] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.yield_latency import percentile, wait_exit  # noqa: E402
from exporter_watchdog.demo.node import DemoNode  # noqa: E402
from tests.support.daemon import DaemonProc  # noqa: E402
from tests.support.tunnel import FAKE_CLOUDFLARED  # noqa: E402
from tests.support.waiting import free_port  # noqa: E402


def run_mode(tunnel: bool, jobs: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix=f"yield-tunnel-{tunnel}-") as tmp:
        config: dict[str, Any] = {"claim": {"gpus": 2, "cooldown_seconds": 0.0}, "log": {"level": "WARNING"}}
        env = {}
        if tunnel:
            token = Path(tmp) / "token"
            token.write_text("benchmark-token\n")
            config["tunnel"] = {"enabled": True, "cloudflared": FAKE_CLOUDFLARED, "token_file": str(token),
                                "metrics": f"127.0.0.1:{free_port()}", "grace_seconds": 1.0,
                                "allow_unauthenticated": True}
            env = {"FAKE_CLOUDFLARED_DRAIN_SECONDS": "0.2", "FAKE_CLOUDFLARED_REGISTER_SECONDS": "0.05"}
        daemon = DaemonProc(Path(tmp), config, env=env)
        latencies = []
        try:
            daemon.start(timeout=120)
            node = DemoNode(daemon.state_dir / "demo-node", "demo-node", 4)
            for i in range(jobs):
                doc = daemon.wait_status(
                    lambda d: d["state"] == "serving" and d["server_ready"]
                    and (not tunnel or d["tunnel"]["state"] == "ready"), 120, "serving (with its connector)")
                pid = doc["server_pid"]
                gpu = doc["claimed_gpus"][i % len(doc["claimed_gpus"])]
                try:
                    fd = os.pidfd_open(pid)
                except ProcessLookupError:
                    raise SystemExit(f"server {pid} exited before job {i}:\n{daemon.log()[-3000:]}") from None
                t0 = time.monotonic()
                job = node.submit(gpus=[gpu], seconds=None)
                gone = wait_exit(fd, 60)
                latencies.append(gone - t0)
                node.cancel(job.job_id)
                label = "tunnel" if tunnel else "no tunnel"
                print(f"\r{label}: {i + 1}/{jobs} jobs, last {latencies[-1] * 1000:.1f} ms", end="", file=sys.stderr)
            print(file=sys.stderr)
        finally:
            daemon.stop()
        return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50, help="jobs per mode and round (default 50)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each runs both modes (default 2)")
    args = parser.parse_args()
    results: dict[str, list[float]] = {"no tunnel": [], "tunnel": []}
    for _ in range(args.rounds):
        results["no tunnel"] += run_mode(False, args.jobs)
        results["tunnel"] += run_mode(True, args.jobs)
    n = args.jobs * args.rounds
    print(f"\nyield latency on the demo node, {n} jobs per mode ({os.cpu_count()} CPUs)")
    print(f"{'mode':<12}{'p50 ms':>10}{'p99 ms':>10}{'mean ms':>10}{'max ms':>10}")
    for mode, values in results.items():
        ms = [v * 1000 for v in values]
        print(f"{mode:<12}{percentile(ms, 50):>10.1f}{percentile(ms, 99):>10.1f}"
              f"{statistics.mean(ms):>10.1f}{max(ms):>10.1f}")
    base, tun = results["no tunnel"], results["tunnel"]
    d50 = (percentile(tun, 50) - percentile(base, 50)) * 1000
    dmean = (statistics.mean(tun) - statistics.mean(base)) * 1000
    print(f"\ntunnel - no tunnel: p50 {d50:+.1f} ms, mean {dmean:+.1f} ms (target: within 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
