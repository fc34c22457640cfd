"""The replay's sacct parser on what a real Slurm 22.05 with slurmdbd prints (stored and fresh).

The stored files in tests/fixtures/sacct/ came from `capture()` below; the `slurm` test captures
again from a fresh accounted cluster and checks both read the same way. EW_UPDATE_SACCT_FIXTURES=1
rewrites the stored files from the fresh capture.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter_watchdog.cli import main
from exporter_watchdog.replay.trace import Trace, parse_sacct, read_sinfo
from tests.conftest_slurm import require_slurm
from tests.support.slurm_accounting import AccountedCluster, ensure_accounting
from tests.support.waiting import wait_for

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sacct"
NAMES = ("cluster-X.sacct", "cluster-steps.sacct", "cluster.sinfo")


def capture(cluster: AccountedCluster) -> dict[str, str]:
    """Run one job of each kind the parser must know, then print sacct (with and without -X) and sinfo."""
    ids = {
        "typed": cluster.sbatch("a30:2", 1),
        "untyped": cluster.sbatch(1, 1),
        "multinode": cluster.sbatch(2, nodes=2, command="srun sleep 1"),
        "array": cluster.sbatch(1, 1, extra=["--array=0-2"]),
        "cpu": cluster.sbatch(None, command="sleep 1"),
    }
    cluster.wait_queue_empty()
    node = cluster.nodes[0]
    ids["running"] = cluster.sbatch("a30:4", 600, extra=["-w", node])
    cluster.wait_job_running(ids["running"])
    # Pending for its GPUs behind the running job, then cancelled before it ever started.
    ids["cancelled"] = cluster.sbatch(1, 1, extra=["-w", node])
    wait_for(lambda: cluster.job_state(ids["cancelled"]) == "PENDING", 30, "the second job to pend")
    cluster.cancel(ids["cancelled"])

    seen: list[str] = [""]

    def recorded() -> str | None:
        text = seen[0] = cluster.sacct("-X")
        starts = {line.split("|")[0] for line in text.splitlines()}
        done = {f"{ids['array']}_{i}" for i in range(3)} | {ids[k] for k in ids if k != "array"}
        return text if done <= starts and "RUNNING" in text and "CANCELLED" in text else None

    try:
        with_x = wait_for(recorded, 60, "slurmdbd to record every job", 0.5)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; ids {ids}; sacct printed:\n{seen[0]}") from None
    steps = cluster.sacct()
    sinfo = cluster.run(["sinfo", "-N", "-h", "-o", "%N %G"]).stdout
    cluster.cancel(ids["running"])
    return {"cluster-X.sacct": with_x, "cluster-steps.sacct": steps, "cluster.sinfo": sinfo}


def shape(trace: Trace) -> list[tuple[str, int, tuple[int, ...], bool]]:
    """What the parser made of each job, without ids, names and times: (kind, nodes, GPUs, ended)."""
    base = min(int(j.job_id.split("_")[0]) for j in trace.jobs)
    out = []
    for job in trace.jobs:
        head, _, index = job.job_id.partition("_")
        kind = f"+{int(head) - base}" + (f"_{index}" if index else "")
        out.append((kind, len(job.nodes), job.gpus, job.end is not None))
    return out


def check(files: dict[str, str], tmp_path: Path) -> None:
    """What must hold of any capture: kinds of jobs read right, steps filtered, replay runs on it."""
    x = parse_sacct(files["cluster-X.sacct"].splitlines(), "cluster-X.sacct")
    gpus = sorted(j.gpus for j in x.jobs)
    assert (2, 2) in gpus  # the multi-node job: gres/gpu=4 over a NodeList hostlist of two nodes
    multi = next(j for j in x.jobs if len(j.nodes) == 2)
    assert multi.nodes[0] != multi.nodes[1]
    assert sum(1 for j in x.jobs if "_" in j.job_id) == 3  # the array's three tasks
    assert (0,) in gpus  # the CPU-only job
    assert sum(1 for j in x.jobs if j.end is None) == 1  # the running job: End is Unknown
    assert next(j for j in x.jobs if j.end is None).gpus == (4,)  # typed gres/gpu:a30=4 counted once
    assert x.skipped.get("never started (pending, or cancelled before start)") == 1  # the job cancelled while pending
    steps = parse_sacct(files["cluster-steps.sacct"].splitlines(), "cluster-steps.sacct")
    assert steps.skipped.get("job steps (run sacct with -X)", 0) >= 3  # batch, extern, srun steps
    assert shape(steps) == shape(x)
    nodes = read_sinfo(_write(tmp_path / "nodes.txt", files["cluster.sinfo"]))
    assert sorted(nodes.values()) == [4, 4] and set(multi.nodes) == set(nodes)
    trace_file = _write(tmp_path / "trace.sacct", files["cluster-X.sacct"])
    assert main(["replay", str(trace_file), "--sinfo", str(tmp_path / "nodes.txt"), "--cold-start", "1",
                 "--json", "--workers", "1"]) == 0


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_stored_capture_reads_right(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {name: (FIXTURES / name).read_text() for name in NAMES}
    check(files, tmp_path)
    doc = json.loads(capsys.readouterr().out)
    assert doc["summary"]["nodes"] == 2 and doc["jobs"] == 8


@pytest.fixture
def accounted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AccountedCluster]:
    require_slurm(ensure_accounting)
    cluster = AccountedCluster(tmp_path_factory.mktemp("slurm-acct")).start()
    yield cluster
    problems = cluster.stop()
    left = cluster.leftovers()
    if problems or left:
        pytest.fail(f"accounted Slurm teardown left things behind: {problems + left}", pytrace=False)


@pytest.mark.slurm
def test_fresh_capture_reads_like_the_stored_one(accounted: AccountedCluster, tmp_path: Path) -> None:
    fresh = capture(accounted)
    check(fresh, tmp_path)
    stored = FIXTURES / "cluster-X.sacct"
    if os.environ.get("EW_UPDATE_SACCT_FIXTURES") == "1" or not stored.exists():
        FIXTURES.mkdir(parents=True, exist_ok=True)
        for name, text in fresh.items():
            (FIXTURES / name).write_text(text)
    assert shape(parse_sacct(fresh["cluster-X.sacct"].splitlines())) == shape(
        parse_sacct(stored.read_text().splitlines()))
