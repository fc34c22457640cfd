"""scontrol show job parsing (real Slurm 22.05 samples) and SlurmClient with fake and real command runners."""

from __future__ import annotations

import re
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from exporter_watchdog.detect.runner import CommandResult, run_command
from exporter_watchdog.detect.scontrol import (
    JobGpus,
    ScontrolParseError,
    SlurmClient,
    parse_index_list,
    parse_show_job,
)
from tests.support.daemon import group_members

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "scontrol"
DEADLINE = 20.0  # generous: other people run tests on the same 2 cores


def sample(name: str) -> str:
    return (FIXTURES / name).read_text()


# --- index lists -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "indices"),
    [
        ("0", {0}),
        ("0-1", {0, 1}),
        ("0,2-3", {0, 2, 3}),
        ("3,1", {1, 3}),
        ("1-2,2-3", {1, 2, 3}),
        ("7-7", {7}),
        (" 0 , 2 ", {0, 2}),
        ("10-12", {10, 11, 12}),
    ],
)
def test_parse_index_list(text: str, indices: set[int]) -> None:
    assert parse_index_list(text) == frozenset(indices)


@pytest.mark.parametrize("text", ["", " ", "N/A", "0,", ",1", "1-", "-1", "3-1", "a", "0;1", "0-1-2", "1.5", "99999"])
def test_parse_index_list_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_index_list(text)


# --- real samples ------------------------------------------------------------------------------------

# (sample, node, job id asked for, state, GPUs on that node); see tests/fixtures/scontrol/README.md.
CASES: list[tuple[str, str, str | None, str, set[int]]] = [
    ("typed_running", "dta1", None, "RUNNING", {0, 1}),
    ("typed_running", "dtu1", None, "RUNNING", set()),  # not our node
    ("untyped_running", "dtu1", None, "RUNNING", {0, 1}),
    ("cpu_only_running", "dta2", None, "RUNNING", set()),
    ("multinode_typed_split", "dta1", None, "RUNNING", {2}),
    ("multinode_typed_split", "dta2", None, "RUNNING", {0}),
    ("multinode_typed_split", "dtu1", None, "RUNNING", set()),
    ("pending", "dta1", None, "PENDING", set()),
    ("multinode_untyped_split", "dtu1", None, "RUNNING", {2, 3}),
    ("multinode_untyped_split", "dtu2", None, "RUNNING", {0, 1}),
    ("cancelled_no_idx", "dta1", None, "CANCELLED", set()),
    ("multi_gres_running", "dta1", None, "RUNNING", {0}),
    ("typed_noncontiguous", "dta1", None, "RUNNING", {0, 2, 3}),
    ("multinode_untyped_grouped", "dtu1", None, "RUNNING", {0}),
    ("multinode_untyped_grouped", "dtu2", None, "RUNNING", {0}),
    ("multinode_hostlist_reordered", "w1", None, "RUNNING", {0}),
    ("multinode_hostlist_reordered", "w2", None, "RUNNING", {0}),
    ("multinode_hostlist_reordered", "w3", None, "RUNNING", set()),
    ("array", "dtu2", "5", "RUNNING", {3}),
    ("array", "dtu2", "6", "RUNNING", {1}),
    ("array", "dtu2", "7", "RUNNING", {2}),
    ("array", "dtu2", None, "RUNNING", {3}),  # no id: the first record, the one asked for
    ("hetjob", "dta2", "8", "RUNNING", {0, 1}),
    ("hetjob", "dtu1", "9", "RUNNING", {1}),
    ("hetjob", "dtu1", "8", "RUNNING", set()),  # component 8 runs on dta2 only
    ("completed_no_idx", "dta2", None, "COMPLETED", set()),
    ("suspended", "dta1", None, "SUSPENDED", {1}),
]


def _job_id_in(text: str) -> str:
    match = re.match(r"JobId=(\S+)", text)
    assert match is not None
    return match.group(1)


@pytest.mark.parametrize(("name", "node", "job_id", "state", "gpus"), CASES, ids=lambda v: str(v))
def test_real_samples_one_line(name: str, node: str, job_id: str | None, state: str, gpus: set[int]) -> None:
    text = sample(f"{name}.txt")
    parsed = parse_show_job(text, node, job_id)
    # Every sample ran as root; the partition is the one of the record asked about (het components differ).
    wanted = job_id or _job_id_in(text)
    record = next(line for line in text.splitlines() if line.startswith(f"JobId={wanted} "))
    partition = re.search(r"\bPartition=(\S+)", record)
    assert partition is not None
    assert parsed == JobGpus(job_id=wanted, state=state, gpus=frozenset(gpus), user="root",
                             partition=partition.group(1))


@pytest.mark.parametrize(
    ("name", "node", "job_id", "state", "gpus"),
    [c for c in CASES if (FIXTURES / f"{c[0]}.multi.txt").exists()],
    ids=lambda v: str(v),
)
def test_real_samples_multi_line(name: str, node: str, job_id: str | None, state: str, gpus: set[int]) -> None:
    parsed = parse_show_job(sample(f"{name}.multi.txt"), node, job_id)
    assert parsed.state == state
    assert parsed.gpus == frozenset(gpus)
    # both forms of the same job at the same moment say the same
    assert parsed == parse_show_job(sample(f"{name}.txt"), node, job_id)


def test_every_sample_is_covered() -> None:
    names = {p.name.split(".")[0] for p in FIXTURES.glob("*.txt")}
    assert names == {c[0] for c in CASES}


# --- edge cases built from a real line -----------------------------------------------------------------

TYPED = sample("typed_running.txt").strip()


def with_detail(detail: str, node_list: str = "dta1") -> str:
    """The real typed_running line with its per-node detail group replaced."""
    text = re.sub(r"Nodes=dta1 CPU_IDs=0 Mem=0 GRES=\S*", detail, TYPED)
    return text.replace("NodeList=dta1", f"NodeList={node_list}")


@pytest.mark.parametrize(
    ("detail", "gpus"),
    [
        ("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=bw(CNT:10),gpu:a30:3(IDX:0,2-3)", {0, 2, 3}),
        ("Nodes=dta1 CPU_IDs=0-1 Mem=0 GRES=gpu:nvidia_a100-sxm4-80gb:2(IDX:6-7)", {6, 7}),
        ("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:1g.5gb:1(IDX:3)", {3}),
        ("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=shard:2(IDX:1)", {1}),
        ("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:a30:1(IDX:0),gpu:t4:1(IDX:3)", {0, 3}),
        ("Nodes=dta[0-1] CPU_IDs=0 Mem=0 GRES=gpu:a30:1(IDX:2)", {2}),
        ("Nodes=dta[2-3] CPU_IDs=0 Mem=0 GRES=gpu:a30:1(IDX:2) Nodes=dta1 CPU_IDs=0 Mem=0 GRES=", set()),
        ("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=bw(CNT:10)", set()),
    ],
)
def test_gres_variants(detail: str, gpus: set[int]) -> None:
    assert parse_show_job(with_detail(detail, "dta[0-3]"), "dta1").gpus == frozenset(gpus)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no JobId"),
        ("slurm_load_jobs error: Invalid job id specified\n", "expected a JobId"),
        ("JobId= JobName=x", "without a JobId"),
        (with_detail("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:2"), "names no indices"),
        (with_detail("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:2(IDX:N/A)"), "bad index"),
        (with_detail("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:2(CNT:2)"), "names no indices"),
        (with_detail("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=mps:100(100/100)"), "names no indices"),
        (with_detail("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:2(IDX:0-1"), "unbalanced"),
        (with_detail("Nodes=dta[1- CPU_IDs=0 Mem=0 GRES=gpu:1(IDX:0)"), "unbalanced"),
        # the job runs here but there is no detail group: scontrol was run without -d
        (with_detail(""), "no per-node GRES detail"),
    ],
)
def test_unreadable_text_raises(text: str, message: str) -> None:
    with pytest.raises(ScontrolParseError, match=re.escape(message)):
        parse_show_job(text, "dta1")


def test_unreadable_gres_of_another_node_does_not_matter() -> None:
    text = with_detail("Nodes=dta1 CPU_IDs=0 Mem=0 GRES=gpu:a30:1(IDX:3) Nodes=dta9 CPU_IDs=0 Mem=0 GRES=gpu:2",
                       "dta[1,9]")
    assert parse_show_job(text, "dta1").gpus == {3}
    with pytest.raises(ScontrolParseError):
        parse_show_job(text, "dta9")


def test_job_name_with_spaces_and_fields_cannot_hide_the_real_gpus() -> None:
    fake = "JobName=x Nodes=dta1 CPU_IDs=0 Mem=0 GRES= y"
    text = TYPED.replace("JobName=wrap", fake)
    assert parse_show_job(text, "dta1") == JobGpus("1", "RUNNING", frozenset({0, 1}), "root", "typed")


def test_job_id_selects_a_record_and_a_missing_one_is_an_error() -> None:
    with pytest.raises(ScontrolParseError, match="no record for job 99"):
        parse_show_job(sample("array.txt"), "dtu2", "99")
    # a single record answers for the id asked about, whatever it calls itself (a SLUID query)
    assert parse_show_job(TYPED, "dta1", "s5K1KKYAYG5D00").gpus == {0, 1}


# --- SlurmClient with a fake runner --------------------------------------------------------------------


class FakeRunner:
    """Records calls and answers with a fixed result or exception."""

    def __init__(self, answer: CommandResult | BaseException, clock: FakeClock | None = None,
                 takes: float = 0.0) -> None:
        self.answer = answer
        self.calls: list[tuple[list[str], float]] = []
        self.clock = clock
        self.takes = takes

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append((list(argv), timeout))
        if self.clock is not None:
            self.clock.now += self.takes
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def client(runner: FakeRunner, clock: FakeClock | None = None, node: str = "dta1") -> SlurmClient:
    return SlurmClient(["scontrol"], node, runner, timeout=1.5, clock=clock or FakeClock())


def test_query_runs_show_job_and_reports_gpus_and_duration() -> None:
    clock = FakeClock()
    runner = FakeRunner(CommandResult(0, sample("typed_noncontiguous.txt"), ""), clock, takes=0.042)
    q = SlurmClient(["/opt/slurm/bin/scontrol", "--local"], "dta1", runner, timeout=1.5, clock=clock).query_job("3")
    assert runner.calls == [(["/opt/slurm/bin/scontrol", "--local", "show", "job", "-d", "-o", "3"], 1.5)]
    assert (q.job_id, q.gpus, q.state, q.error) == ("3", frozenset({0, 2, 3}), "RUNNING", None)
    assert q.duration == pytest.approx(0.042)


def test_query_cpu_only_job_is_known_and_empty() -> None:
    q = client(FakeRunner(CommandResult(0, sample("cpu_only_running.txt"), "")), node="dta2").query_job("3")
    assert q.gpus == frozenset() and q.error is None


def test_timeout_is_unknown() -> None:
    clock = FakeClock()
    q = client(FakeRunner(TimeoutError("too slow"), clock, takes=1.5), clock).query_job("7")
    assert q.gpus is None and q.state is None
    assert q.error is not None and "timed out after 1.5 s" in q.error
    assert q.duration == pytest.approx(1.5)


def test_invalid_job_id_from_slurm_is_unknown() -> None:
    q = client(FakeRunner(CommandResult(1, "", sample("invalid_job_id.stderr")))).query_job("99999")
    assert q.gpus is None
    assert q.error is not None and "does not know job 99999" in q.error


def test_nonzero_exit_is_unknown_and_names_the_reason() -> None:
    q = client(FakeRunner(CommandResult(1, "", sample("controller_down.stderr")))).query_job("3")
    assert q.gpus is None
    assert q.error is not None and "exited 1" in q.error and "Unable to contact slurm controller" in q.error


def test_nonzero_exit_even_with_good_stdout_is_unknown() -> None:
    q = client(FakeRunner(CommandResult(2, sample("typed_running.txt"), ""))).query_job("1")
    assert q.gpus is None and q.error is not None and "exited 2" in q.error


def test_unparseable_output_is_unknown() -> None:
    q = client(FakeRunner(CommandResult(0, "something else entirely\n", ""))).query_job("1")
    assert q.gpus is None and q.error is not None and "unreadable" in q.error


def test_missing_program_is_unknown() -> None:
    q = client(FakeRunner(FileNotFoundError(2, "No such file or directory", "scontrol"))).query_job("1")
    assert q.gpus is None and q.error is not None and "No such file" in q.error


@pytest.mark.parametrize("job_id", ["", "-h", "1 2", "1;rm", "../1", "x" * 100])
def test_bad_job_ids_never_reach_the_command_line(job_id: str) -> None:
    runner = FakeRunner(CommandResult(0, TYPED, ""))
    q = client(runner).query_job(job_id)
    assert runner.calls == []
    assert q.gpus is None and q.error is not None and "invalid job id" in q.error


@pytest.mark.parametrize("job_id", ["5", "5_1", "8+0", "s5K1KKYAYG5D00"])
def test_good_job_id_forms_are_passed(job_id: str) -> None:
    runner = FakeRunner(CommandResult(0, TYPED, ""))
    client(runner).query_job(job_id)
    assert runner.calls[0][0][-1] == job_id


# --- the real runner ------------------------------------------------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_run_command_returns_output_and_status(tmp_path: Path) -> None:
    prog = script(tmp_path, "ok.sh", 'echo "out $1"; echo err >&2; exit 3\n')
    assert run_command([str(prog), "x y"], 10.0) == CommandResult(3, "out x y\n", "err\n")


def test_run_command_passes_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "slurm.conf"))
    prog = script(tmp_path, "env.sh", 'printf %s "$SLURM_CONF"\n')
    assert run_command([str(prog)], 10.0).stdout == str(tmp_path / "slurm.conf")


def test_run_command_missing_program_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        run_command([str(tmp_path / "no-such-scontrol")], 10.0)


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    # The script starts a grandchild and both sleep far past the timeout.
    prog = script(tmp_path, "slow.sh", f'echo $$ > {tmp_path}/leader.pid\nsleep 300 &\n'
                                       f'echo $! > {tmp_path}/child.pid\necho started\nsleep 300\n')
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 2 s"):
        run_command([str(prog)], 2.0)
    assert time.monotonic() - start < DEADLINE
    leader = int((tmp_path / "leader.pid").read_text())
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + DEADLINE
    # Gone means no live member: the reparented grandchild may linger as a zombie until init reaps it.
    while live := [(pid, st) for pid, st in group_members(leader) if st != "Z"]:
        assert time.monotonic() < deadline, f"process group {leader} still has live members {live}"
        time.sleep(0.01)
    assert all(pid != child or st == "Z" for pid, st in group_members(leader))


def test_client_with_real_runner_and_a_fake_scontrol(tmp_path: Path) -> None:
    prog = script(tmp_path, "scontrol", f'[ "$*" = "show job -d -o 4" ] || exit 9\n'
                                         f'cat {FIXTURES / "multinode_typed_split.txt"}\n')
    q = SlurmClient([str(prog)], "dta2", run_command, timeout=DEADLINE).query_job("4")
    assert (q.gpus, q.state, q.error) == (frozenset({0}), "RUNNING", None)


def test_client_with_real_runner_times_out_and_leaves_nothing(tmp_path: Path) -> None:
    prog = script(tmp_path, "scontrol", f"echo $$ > {tmp_path}/leader.pid\nexec sleep 300\n")
    q = SlurmClient([str(prog)], "dta1", run_command, timeout=1.0).query_job("1")
    assert q.gpus is None and q.error is not None and "timed out" in q.error
    assert q.duration >= 1.0
    leader = int((tmp_path / "leader.pid").read_text())
    assert [st for _, st in group_members(leader) if st != "Z"] == []


@pytest.mark.parametrize("text", [
    "JobId=5 <<not scontrol>> TRES=gpu:(IDX:?) \x01\xff",
    "JobId=5 JobName=x NodeList=n1",  # no JobState: cut short
    "JobId=5 JobState=RUNNING",  # no NodeList: cut short
])
def test_output_that_is_not_a_job_record_is_an_error_not_a_cpu_only_job(text: str) -> None:
    with pytest.raises(ScontrolParseError, match=r"job 5.*: no (JobState|NodeList)="):
        parse_show_job(text, "n1", "5")
