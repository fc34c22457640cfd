"""The daemon beside a real slurmctld/slurmd: real job cgroups seen by inotify, real scontrol answers."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import EXE, DaemonProc, group_alive, pid_alive
from tests.support.netns import SlurmMultiNode
from tests.support.slurm_cluster import CGROUP_ROOT, SlurmCluster, wait_for

pytestmark = pytest.mark.slurm

COOLDOWN = 1.0
SLURM_TIMEOUT = 2.0
# Longest the server may keep running on a job's GPUs: detection (inotify, the loop's rescan as the
# fallback), at most SLURM_TIMEOUT asking Slurm, then stopping the stub server; plus slack for a
# loaded 2-core machine.
YIELD_BOUND = SLURM_TIMEOUT + 1.0 + 2.0


def daemon_config(node: str, claim: int = 2, gpus: int = 4) -> dict[str, Any]:
    """The config of issue 3: node name and GPU count, the demo profile, real cgroups."""
    return {
        "node": {"name": node, "gpus": gpus},
        "claim": {"gpus": claim, "cooldown_seconds": COOLDOWN},
        "server": {"profile": "demo", "backoff_initial_seconds": 0.5},
        "slurm": {"cgroup_root": str(CGROUP_ROOT), "timeout_seconds": SLURM_TIMEOUT, "rescan_seconds": 1.0},
    }


def metric(daemon: DaemonProc, name: str, **labels: str) -> float:
    """One sample of the daemon's /metrics (0 when the series is absent)."""
    for family in text_string_to_metric_families(daemon.metrics()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def status_cli(config_path: Path) -> dict[str, Any] | None:
    """`exporter-watchdog status --json --config F` (over the control socket), or None on failure."""
    proc = subprocess.run([*EXE, "status", "--json", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def cli_until(daemon: DaemonProc, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """Poll `status --json` until `check` holds."""
    def ok() -> dict[str, Any] | None:
        doc = status_cli(daemon.config_path)
        return doc if doc is not None and check(doc) else None

    try:
        return wait_for(ok, 90, f"{daemon.config['node']['name']}: {what}", 0.2)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n--- daemon log (tail) ---\n{daemon.log()[-4000:]}") from None


def seen_job(daemon: DaemonProc, job: str, gpus: list[int] | None = None) -> dict[str, Any]:
    """Wait until the daemon lists the job (with these GPUs, when given)."""
    def listed(doc: dict[str, Any]) -> bool:
        return any(j["job_id"] == job and (gpus is None or j["gpus"] == gpus) for j in doc["jobs"])

    return daemon.wait_status(listed, 60, f"job {job} in the daemon's status")


def held(cluster: SlurmCluster, job: str) -> set[int]:
    """GPU indices Slurm gave a running job on the cluster's node."""
    detail = cluster.job_gres(job)[cluster.node]
    if "IDX:" not in detail:
        return set()
    found: set[int] = set()
    for part in detail.split("IDX:")[1].rstrip(")").split(","):
        lo, _, hi = part.partition("-")
        found.update(range(int(lo), int(hi or lo) + 1))
    return found


def stays(daemon: DaemonProc, check: Callable[[dict[str, Any]], bool], seconds: float, what: str) -> None:
    """Sample the status for `seconds` (several cool-downs) and fail on the first sample that breaks `check`."""
    deadline = time.monotonic() + seconds
    samples = 0
    while time.monotonic() < deadline or samples < 5:
        doc = daemon.status()
        assert doc is not None, "the daemon stopped answering"
        assert check(doc), f"{what}: {doc}"
        samples += 1
        time.sleep(0.1)  # the sampling interval


@pytest.fixture
def quiet(slurm_cluster: SlurmCluster) -> SlurmCluster:
    """The shared cluster with no job and no job directory left from an earlier test."""
    slurm_cluster.cancel_all()
    wait_for(lambda: not slurm_cluster.job_cgroup_dirs(), 60, "job cgroup dirs to go")
    return slurm_cluster


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    """Start `exporter-watchdog serve` against a cluster; stopped (and checked) after the test."""
    made: list[DaemonProc] = []

    def start(cluster: SlurmCluster, claim: int = 2, wait: str | None = "serving") -> DaemonProc:
        folder = tmp_path / f"daemon{len(made)}"
        folder.mkdir()
        daemon = DaemonProc(folder, daemon_config(cluster.node, claim), demo=False,
                            env={"SLURM_CONF": str(cluster.conf)})
        made.append(daemon)
        return daemon.start(wait_state=wait, timeout=90)

    yield start
    for daemon in made:
        record = daemon.server_record()
        daemon.stop()
        if record:
            assert not group_alive(int(record["pgid"])), "the server outlived its daemon"


def test_claims_the_two_highest_free_gpus_around_running_jobs(
    quiet: SlurmCluster, start_daemon: Callable[..., DaemonProc]
) -> None:
    jobs = [quiet.sbatch(1) for _ in range(3)]
    for job in jobs:
        quiet.wait_job_running(job)
    # Hand one back so the free GPUs are not simply the top ones.
    quiet.cancel(jobs[1])
    quiet.wait_job_done(jobs[1])
    wait_for(lambda: quiet.job_cgroup_dir(jobs[1]) is None, 60, "the cancelled job's cgroup to go")
    taken = held(quiet, jobs[0]) | held(quiet, jobs[2])
    expected = sorted(set(range(4)) - taken)[-2:]

    daemon = start_daemon(quiet)
    doc = daemon.status()
    assert doc is not None and doc["claimed_gpus"] == expected
    env = Path(f"/proc/{doc['server_pid']}/environ").read_bytes().split(b"\0")
    assert f"CUDA_VISIBLE_DEVICES={','.join(map(str, expected))}".encode() in env

    cli = status_cli(daemon.config_path)
    assert cli is not None
    assert {k: cli[k] for k in ("state", "claimed_gpus", "profile", "server_pid")} == {
        "state": "serving", "claimed_gpus": expected, "profile": "demo", "server_pid": doc["server_pid"],
    }


def test_jobs_on_other_gpus_and_cpu_only_jobs_change_nothing(
    quiet: SlurmCluster, start_daemon: Callable[..., DaemonProc]
) -> None:
    daemon = start_daemon(quiet)
    first = daemon.status()
    assert first is not None
    gpu_job = quiet.sbatch(2)
    cpu_job = quiet.sbatch(None)
    for job in (gpu_job, cpu_job):
        quiet.wait_job_running(job)
    gpus = held(quiet, gpu_job)
    assert not gpus & set(first["claimed_gpus"]), "Slurm put the job on our GPUs; the premise fails"
    seen_job(daemon, gpu_job, sorted(gpus))
    doc = seen_job(daemon, cpu_job, [])
    assert doc["state"] == "serving" and doc["server_pid"] == first["server_pid"]
    assert doc["last_yield"] is None
    assert metric(daemon, "exporter_watchdog_job_conflicts_total") == 0
    assert sum(metric(daemon, "exporter_watchdog_yields_total", reason=r)
               for r in ("job", "slurm_unknown", "any_job", "prolog", "gpu_process")) == 0
    assert metric(daemon, "exporter_watchdog_jobs_seen_total") >= 2


def test_overlapping_job_makes_it_yield_until_enough_gpus_are_free(
    quiet: SlurmCluster, start_daemon: Callable[..., DaemonProc]
) -> None:
    daemon = start_daemon(quiet)
    first = daemon.status()
    assert first is not None
    other = quiet.sbatch(2)
    quiet.wait_job_running(other)
    seen_job(daemon, other)
    overlapping = quiet.sbatch(1)
    quiet.wait_job_running(overlapping)
    assert held(quiet, overlapping) & set(first["claimed_gpus"]), "the job does not overlap; premise fails"

    doc = daemon.wait_status(lambda d: d["server_pid"] is None, 60, "the server to stop")
    assert not group_alive(first["server_pid"])
    assert doc["last_yield"]["reason"] == "job" and doc["last_yield"]["jobs"] == [overlapping]
    # One GPU is free and it claims two: it stays off, well past the cool-down.
    stays(daemon, lambda d: d["server_pid"] is None and d["state"] == "idle", 3 * COOLDOWN + 1, "started too early")

    quiet.cancel(overlapping)
    doc = daemon.wait_state("serving", 60)
    assert not set(doc["claimed_gpus"]) & held(quiet, other)
    assert metric(daemon, "exporter_watchdog_job_conflicts_total") == 1
    assert metric(daemon, "exporter_watchdog_yields_total", reason="job") == 1


def test_claiming_all_gpus_any_gpu_job_makes_it_yield(
    quiet: SlurmCluster, start_daemon: Callable[..., DaemonProc]
) -> None:
    daemon = start_daemon(quiet, claim=4)
    first = daemon.status()
    assert first is not None and first["claimed_gpus"] == [0, 1, 2, 3]
    cpu_job = quiet.sbatch(None)
    quiet.wait_job_running(cpu_job)
    doc = seen_job(daemon, cpu_job, [])
    assert doc["server_pid"] == first["server_pid"]  # a CPU-only job still changes nothing

    job = quiet.sbatch(1)
    doc = daemon.wait_status(lambda d: d["server_pid"] is None, 60, "the server to stop")
    assert not group_alive(first["server_pid"])
    assert doc["last_yield"]["jobs"] == [job]
    quiet.cancel(job)
    doc = daemon.wait_state("serving", 60)
    assert doc["claimed_gpus"] == [0, 1, 2, 3]


GATE_PROLOG = """#!/bin/sh
# Holds each job at its Prolog until the test opens the gate (at most 60 s): the job's cgroup
# directory appears only after the Prolog, so the test decides when that happens.
touch {folder}/started-$SLURM_JOB_ID
i=0
while [ ! -e {folder}/open ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
exit 0
"""


def test_fail_safe_yield_while_slurmctld_is_down_and_recovery(
    tmp_path: Path, slurm_cluster_factory: Callable[..., SlurmCluster],
    start_daemon: Callable[..., DaemonProc],
) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    prolog = tmp_path / "gate.sh"
    prolog.write_text(GATE_PROLOG.format(folder=gate))
    prolog.chmod(0o755)
    cluster = slurm_cluster_factory(prolog=str(prolog), prolog_flags="Alloc,Contain")
    daemon = start_daemon(cluster)
    first = daemon.status()
    assert first is not None

    job = cluster.sbatch(1)  # Slurm gives it a low GPU, not one of ours
    try:
        wait_for(lambda: (gate / f"started-{job}").exists(), 60, "the job's Prolog to start")
        gpus = held(cluster, job)
        assert not gpus & set(first["claimed_gpus"])
        cluster.stop_slurmctld()
    finally:
        (gate / "open").touch()  # never leave a job (and the teardown) hanging in the Prolog
    cluster.wait_job_cgroup(job)

    # Slurm cannot say which GPUs the new job holds: after the Slurm timeout the server goes.
    doc = daemon.wait_status(lambda d: d["server_pid"] is None, 60, "the fail-safe yield")
    assert not group_alive(first["server_pid"])
    assert doc["last_yield"]["reason"] == "slurm_unknown" and doc["last_yield"]["jobs"] == [job]
    stays(daemon, lambda d: d["server_pid"] is None, 2 * COOLDOWN + SLURM_TIMEOUT, "served without Slurm")

    cluster.start_slurmctld()
    # Slurm answers again: the job holds other GPUs, so it serves while the job still runs.
    doc = daemon.wait_state("serving", 90)
    assert cluster.job_state(job) == "RUNNING"
    assert not set(doc["claimed_gpus"]) & gpus
    assert any(j["job_id"] == job and j["gpus"] == sorted(gpus) for j in doc["jobs"])


@dataclass
class _Samples:
    """What the sampler saw: (time, job directories present, server PIDs alive)."""

    rows: list[tuple[float, frozenset[str], frozenset[int]]] = field(default_factory=list)
    claims: dict[int, frozenset[int]] = field(default_factory=dict)  # server pid -> its GPUs
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


def _sample(daemon: DaemonProc, cluster: SlurmCluster, out: _Samples) -> None:
    """Every few ms: which job directories exist and which server processes are alive."""
    try:
        while not out.stop.is_set():
            doc = daemon.status()
            if doc is not None and doc["server_pid"] and doc["server_pid"] not in out.claims:
                out.claims[doc["server_pid"]] = frozenset(doc["claimed_gpus"])
            jobs = frozenset(p.name.removeprefix("job_") for p in cluster.job_cgroup_dirs())
            alive = frozenset(pid for pid in out.claims if pid_alive(pid))
            out.rows.append((time.monotonic(), jobs, alive))
            out.stop.wait(0.02)
    except BaseException as exc:  # surfaced by the test thread
        out.error = exc


def daemon_yields(daemon: DaemonProc) -> float:
    """exporter_watchdog_yields_total{reason="job"} from the daemon's /metrics."""
    for line in daemon.metrics().splitlines():
        if line.startswith('exporter_watchdog_yields_total{reason="job"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no exporter_watchdog_yields_total{reason=\"job\"} in /metrics")


def test_churn_of_50_jobs_never_leaves_the_server_on_a_jobs_gpus(
    quiet: SlurmCluster, start_daemon: Callable[..., DaemonProc]
) -> None:
    seed = int(os.environ.get("CHURN_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)
    rng = random.Random(seed)
    daemon = start_daemon(quiet)
    samples = _Samples()
    sampler = threading.Thread(target=_sample, args=(daemon, quiet, samples), daemon=True)
    sampler.start()
    gpus_file = quiet.workdir / "out" / "$SLURM_JOB_ID.gpus"
    submitted: list[str] = []
    try:
        while len(submitted) < 50:
            # At most 2 jobs queued or running, so jobs keep starting and ending all the time; now and
            # then the next job waits until the server is back, so it can land on a serving node.
            wait_for(lambda: len(quiet.queue()) < 2, 120, "room in the queue", 0.05)
            if rng.random() < 0.3:
                daemon.wait_state("serving", 90)
            count = rng.choice([None, 1, 1, 2, 2, 3, 4])
            seconds = rng.uniform(0.2, 2.5)
            submitted.append(quiet.sbatch(
                count, command=f'echo "$SLURM_JOB_GPUS" > {gpus_file}; exec sleep {seconds:.2f}'
            ))
        quiet.wait_queue_empty(180)
        wait_for(lambda: not quiet.job_cgroup_dirs(), 60, "job cgroup dirs to go")
        daemon.wait_state("serving", 90)
    finally:
        samples.stop.set()
        sampler.join(30)
    assert samples.error is None, f"sampler failed: {samples.error!r}"

    job_gpus: dict[str, frozenset[int]] = {}
    for job in submitted:
        text = (quiet.workdir / "out" / f"{job}.gpus").read_text().strip()
        job_gpus[job] = frozenset(int(g) for g in text.split(",") if g)
    first_seen: dict[str, float] = {}
    exposure: dict[str, float] = {}
    for when, jobs, alive in samples.rows:
        for job in jobs:
            first_seen.setdefault(job, when)
            if any(samples.claims[pid] & job_gpus.get(job, frozenset()) for pid in alive):
                exposure[job] = when - first_seen[job]
    assert set(first_seen) == set(submitted), "the sampler missed job directories"
    assert len(samples.claims) >= 2, "the churn never made the server yield and come back"
    # Jobs did land on the running server's GPUs: the daemon yielded to them. The sampler (about 0.1 s
    # apart) may catch none of those overlaps, since a yield takes milliseconds; any it catches must be short.
    yields = daemon_yields(daemon)
    assert yields >= 1, f"seed {seed}: no job ever landed on the running server's GPUs"
    worst = max(exposure.values(), default=0.0)
    print(f"churn seed {seed}: {len(samples.rows)} samples, {len(samples.claims)} servers, {yields:g} yields to"
          f" jobs, {len(exposure)} overlaps caught by the sampler, longest {worst:.3f} s"
          f" (sampled: a job directory counts from the first sample that saw it)")
    assert worst <= YIELD_BOUND, f"seed {seed}: server on a job's GPUs for {exposure}"


def test_two_node_job_makes_the_daemons_on_both_workers_yield(
    tmp_path: Path, slurm_multinode: SlurmMultiNode
) -> None:
    daemons: list[DaemonProc] = []
    try:
        for worker in slurm_multinode.workers:
            folder = tmp_path / worker
            folder.mkdir()
            daemon = DaemonProc(
                folder, daemon_config(worker, claim=1, gpus=slurm_multinode.gpus_per_worker), demo=False,
                env=slurm_multinode.worker_env(worker), prefix=slurm_multinode.net.wrap(worker, []),
            )
            daemons.append(daemon.start(wait_state=None))
        # Each daemon lives in its worker's network; its control socket is a file we can reach.
        pids = [cli_until(d, lambda s: s["state"] == "serving", "serving")["server_pid"] for d in daemons]
        job = slurm_multinode.sbatch(slurm_multinode.gpus_per_worker, nodes=2)
        slurm_multinode.wait_job_running(job)
        for daemon, pid in zip(daemons, pids, strict=True):
            doc = cli_until(daemon, lambda s: s["server_pid"] is None, "the yield")
            assert doc["last_yield"]["jobs"] == [job]
            assert not group_alive(pid)
        slurm_multinode.cancel(job)
        for daemon in daemons:
            cli_until(daemon, lambda s: s["state"] == "serving", "serving again")
    finally:
        for daemon in daemons:
            daemon.stop()
