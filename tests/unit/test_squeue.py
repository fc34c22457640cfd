"""The squeue job lister: parsing, the fail-safe placeholder, change detection, scontrol delegation."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from exporter_watchdog.config import load_config
from exporter_watchdog.detect.runner import CommandResult
from exporter_watchdog.detect.scontrol import JobQuery
from exporter_watchdog.detect.squeue import (
    UNREACHABLE,
    SqueueJobs,
    SqueueParseError,
    parse_job_ids,
    squeue_argv,
)


class FakeRunner:
    """Answers each call with the next scripted result (a CommandResult or an exception)."""

    def __init__(self, *answers: CommandResult | BaseException) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[list[str], float]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append((list(argv), timeout))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeSlurm:
    def __init__(self) -> None:
        self.asked: list[str] = []

    def query_job(self, job_id: str) -> JobQuery:
        self.asked.append(job_id)
        return JobQuery(job_id=job_id, gpus=frozenset({1}), state="RUNNING", duration=0.01, error=None)


def ok(text: str) -> CommandResult:
    return CommandResult(0, text, "")


def lister(runner: FakeRunner, slurm: FakeSlurm | None = None, wake: threading.Event | None = None,
           interval: float = 2.0) -> SqueueJobs:
    now = [100.0]

    def clock() -> float:
        now[0] += 0.5
        return now[0]

    event = wake or threading.Event()
    return SqueueJobs(["squeue"], "w1", runner, slurm or FakeSlurm(), event.set, interval=interval, timeout=1.5,
                      clock=clock)


def test_argv_asks_for_this_nodes_running_jobs_by_their_own_id() -> None:
    assert squeue_argv(["/opt/slurm/bin/squeue"], "w1") == [
        "/opt/slurm/bin/squeue", "--noheader", "--nodelist=w1", "--states=RUNNING,CONFIGURING,COMPLETING",
        "--format=%A",
    ]


def test_parse_job_ids() -> None:
    assert parse_job_ids("12\n  13 \n\n12\n") == frozenset({"12", "13"})
    assert parse_job_ids("") == frozenset()
    for bad in ("12_3\n", "JOBID\n12\n", "-h\n", "12 13\n"):
        with pytest.raises(SqueueParseError):
            parse_job_ids(bad)


def test_lists_jobs_and_records_when_each_was_first_seen() -> None:
    runner = FakeRunner(ok("7\n"), ok("7\n8\n"), ok("8\n"))
    jobs = lister(runner)
    assert jobs.refresh() is True
    assert jobs.jobs() == {"7": None}
    seen7 = jobs.first_seen("7")
    assert jobs.refresh() is True
    assert jobs.jobs() == {"7": None, "8": None}
    assert jobs.first_seen("7") == seen7
    assert jobs.first_seen("8") is not None and jobs.first_seen("8") > seen7  # type: ignore[operator]
    assert jobs.refresh() is True
    assert jobs.jobs() == {"8": None}
    jobs.forget(["7"])
    assert jobs.first_seen("7") is None
    assert runner.calls[0] == (squeue_argv(["squeue"], "w1"), 1.5)


def test_unchanged_listing_is_not_a_change() -> None:
    jobs = lister(FakeRunner(ok("7\n")))
    assert jobs.refresh() is True
    assert jobs.refresh() is False


@pytest.mark.parametrize("failure", [
    TimeoutError("squeue did not finish within 1.5 s"),
    FileNotFoundError(2, "No such file or directory"),
    CommandResult(1, "", "squeue: error: Unable to contact slurm controller (connect failure)\n"),
    CommandResult(0, "JOBID\n", ""),
])
def test_failure_keeps_known_jobs_and_adds_the_placeholder_with_unknown_gpus(
    failure: CommandResult | BaseException,
) -> None:
    slurm = FakeSlurm()
    jobs = lister(FakeRunner(ok("7\n"), failure, ok("7\n")), slurm)
    jobs.refresh()
    assert jobs.refresh() is True  # losing Slurm is a change: the daemon must decide again
    assert jobs.jobs() == {"7": None, UNREACHABLE: None}
    answer = jobs.query_job(UNREACHABLE)
    assert answer.gpus is None and answer.error
    assert slurm.asked == []  # the placeholder never reaches scontrol
    assert jobs.refresh() is True  # squeue answers again: the placeholder goes
    assert jobs.jobs() == {"7": None}


def test_real_jobs_are_described_by_scontrol() -> None:
    slurm = FakeSlurm()
    jobs = lister(FakeRunner(ok("7\n")), slurm)
    assert jobs.query_job("7").gpus == frozenset({1})
    assert slurm.asked == ["7"]


def test_poller_wakes_the_daemon_on_a_new_job_and_stops() -> None:
    wake = threading.Event()
    runner = FakeRunner(ok(""), ok(""), ok("9\n"))
    jobs = lister(runner, wake=wake, interval=0.01)
    jobs.start()
    try:
        assert wake.wait(10), "no wake-up for job 9"
        assert "9" in jobs.jobs()
    finally:
        jobs.stop()
    calls = len(runner.calls)
    assert not any(t.name == "squeue-poll" for t in threading.enumerate())
    assert len(runner.calls) == calls


def test_config_accepts_the_squeue_mode_and_rejects_a_bad_interval() -> None:
    config = load_config(None, {"slurm.detect": "squeue", "slurm.squeue_interval_seconds": 0.5,
                                "slurm.squeue": "/usr/bin/squeue -M c1"})
    assert config.slurm.detect == "squeue"
    assert config.slurm.squeue_interval_seconds == 0.5
    assert config.slurm.squeue == ("/usr/bin/squeue", "-M", "c1")
    with pytest.raises(Exception, match="slurm.squeue_interval_seconds"):
        load_config(None, {"slurm.squeue_interval_seconds": 0})
