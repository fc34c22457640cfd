"""The /proc reader against fixture folders, and against the real /proc for this process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from exporter_watchdog.act import procs
from exporter_watchdog.act.procs import ProcInfo


def stat_line(pid: int, comm: str, state: str, ppid: int, pgid: int, sid: int, start: int) -> str:
    # Fields 7..21 are filler; field 22 is starttime, then a few more the parser must ignore.
    filler = " ".join(str(n) for n in range(7, 22))
    return f"{pid} ({comm}) {state} {ppid} {pgid} {sid} {filler} {start} 4096 100 18446744073709551615\n"


def make_proc(
    root: Path,
    pid: int,
    *,
    comm: str = "python3",
    state: str = "S",
    ppid: int = 1,
    pgid: int | None = None,
    sid: int | None = None,
    start: int = 1000,
    environ: bytes | None = None,
    cgroup: str | None = None,
) -> None:
    d = root / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(stat_line(pid, comm, state, ppid, pgid or pid, sid or pid, start))
    if environ is not None:
        (d / "environ").write_bytes(environ)
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)


@pytest.mark.parametrize(
    "comm",
    ["vllm", "python3 -m vllm", "a) b (c", ") S 9 9 9", "(sd-pam)", ""],
)
def test_comm_with_spaces_and_parentheses(tmp_path: Path, comm: str) -> None:
    make_proc(tmp_path, 42, comm=comm, state="R", ppid=7, pgid=40, sid=30, start=123456)
    assert procs.read_proc(42, tmp_path) == ProcInfo(
        pid=42, ppid=7, pgid=40, sid=30, state="R", start_ticks=123456
    )


def test_list_skips_vanished_and_foreign_entries(tmp_path: Path) -> None:
    make_proc(tmp_path, 10, start=5)
    make_proc(tmp_path, 11, start=6)
    (tmp_path / "12").mkdir()  # exited between readdir and open: no stat any more
    (tmp_path / "13").mkdir()
    (tmp_path / "13" / "stat").write_text("")  # caught mid-exit
    (tmp_path / "self").mkdir()
    (tmp_path / "meminfo").write_text("MemTotal: 1 kB\n")
    found = sorted(procs.list_processes(tmp_path), key=lambda p: p.pid)
    assert [(p.pid, p.start_ticks) for p in found] == [(10, 5), (11, 6)]
    assert procs.read_proc(12, tmp_path) is None
    assert procs.read_proc(999, tmp_path) is None
    assert procs.list_processes(tmp_path / "missing") == []


def test_parse_stat_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="not a /proc/PID/stat line"):
        procs.parse_stat("hello")
    with pytest.raises(ValueError, match="short"):
        procs.parse_stat("1 (x) S 0 1 1")


def test_live_members_by_group_or_session_without_zombies(tmp_path: Path) -> None:
    make_proc(tmp_path, 100, pgid=100, sid=100)  # server leader
    make_proc(tmp_path, 101, ppid=100, pgid=100, sid=100)  # worker in the group
    make_proc(tmp_path, 102, ppid=101, pgid=102, sid=100)  # called setpgid: session only
    make_proc(tmp_path, 103, ppid=100, pgid=100, sid=100, state="Z")  # exited, not reaped
    make_proc(tmp_path, 104, ppid=1, pgid=100, sid=90)  # joined the group from another session
    make_proc(tmp_path, 200, pgid=200, sid=200)  # unrelated
    make_proc(tmp_path, 201, pgid=200, sid=200, state="X")
    members = procs.live_members(100, procs.list_processes(tmp_path))
    assert sorted(p.pid for p in members) == [100, 101, 102, 104]
    assert procs.live_members(300, procs.list_processes(tmp_path)) == []


def test_environ_and_cgroup(tmp_path: Path) -> None:
    make_proc(
        tmp_path,
        7,
        environ=b"PATH=/usr/bin\0EXPORTER_WATCHDOG_SERVER=abc=def\0EMPTY=\0junk\0\xff\xfe=1\0",
        cgroup="0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0\n",
    )
    make_proc(tmp_path, 8)
    env = procs.read_environ(7, tmp_path)
    assert env is not None
    assert env["PATH"] == "/usr/bin"
    assert env["EXPORTER_WATCHDOG_SERVER"] == "abc=def"  # only the first '=' splits
    assert env["EMPTY"] == ""
    assert "junk" not in env
    assert len(env) == 4
    assert procs.read_cgroup(7, tmp_path) == ["0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0"]
    assert procs.read_environ(8, tmp_path) is None  # no such file: gone
    assert procs.read_cgroup(8, tmp_path) is None
    assert procs.read_environ(9, tmp_path) is None


def test_real_proc_describes_this_process() -> None:
    me = procs.read_proc(os.getpid())
    assert me is not None
    assert (me.ppid, me.pgid, me.sid) == (os.getppid(), os.getpgid(0), os.getsid(0))
    assert me.alive and me.start_ticks > 0
    assert me in procs.list_processes()
    env = procs.read_environ(os.getpid())
    assert env is not None and env.get("PATH") == os.environ.get("PATH")
    cgroup = procs.read_cgroup(os.getpid())
    assert cgroup is not None and all(":" in line for line in cgroup)


def test_signal_verified_refuses_a_different_start_time() -> None:
    me = procs.read_proc(os.getpid())
    assert me is not None
    # Same pid, another start time: what a reused pid looks like. Signal 0 probes without harm.
    impostor = ProcInfo(me.pid, me.ppid, me.pgid, me.sid, me.state, me.start_ticks + 1)
    assert procs.signal_verified(impostor, 0) is False
    assert procs.signal_verified(me, 0) is True
