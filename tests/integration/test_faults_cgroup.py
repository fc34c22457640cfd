"""Stops that nothing escapes: the server in a cgroup of its own (real cgroup v2 and v1 here, as root).

The server's grandchild calls setsid and replaces its environment (no marker left): only the cgroup
still knows it belongs to the server. Discovery of where cgroups may be made runs on temp folders.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter_watchdog.act.cgroup import CgroupParent, find_parent, parent_at
from exporter_watchdog.act.supervisor import Supervisor
from tests.support.daemon import EXE, pid_alive, wait_until
from tests.support.faults import FAULT_SERVER, pidfds, server_pids, wait_all_gone
from tests.support.waiting import free_port

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="creating cgroups needs root here")
HIERARCHIES = {
    "v2": Path("/sys/fs/cgroup/unified"),
    "v1-freezer": Path("/sys/fs/cgroup/freezer"),
    "v1-pids": Path("/sys/fs/cgroup/pids"),
}


@pytest.fixture
def cgroup_parent(request: pytest.FixtureRequest) -> Iterator[CgroupParent]:
    mount = HIERARCHIES[request.param]
    if not (mount / "cgroup.procs").exists():
        pytest.fail(f"{mount} is not a cgroup mount on this machine")
    path = mount / f"ew-test-{os.getpid()}-{request.param}"
    parent = parent_at(path)
    yield parent
    for child in [p for p in path.iterdir() if p.is_dir()]:
        for pid in (child / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)  # only what a failed test left in our own cgroup
        wait_until(lambda c=child: not (c / "cgroup.procs").read_text().strip(), 10, f"{child} empty")
        child.rmdir()
    path.rmdir()


def _start(tmp_path: Path, parent: CgroupParent | None) -> tuple[Supervisor, list[int]]:
    sup = Supervisor(tmp_path / "server.json", tmp_path / "server.log", term_timeout=2.0, cgroup_parent=parent)
    argv = [sys.executable, str(FAULT_SERVER), "--port", str(free_port()), "--pids-file", str(tmp_path / "pids.json"),
            "--setsid-child", "--scrub-env"]
    sup.start(argv, {"PATH": os.environ["PATH"]}, gpus=[2, 3])
    return sup, server_pids(tmp_path)


@needs_root
@pytest.mark.parametrize("cgroup_parent", list(HIERARCHIES), indirect=True)
def test_a_setsid_child_without_the_marker_is_gone_after_a_stop(tmp_path: Path, cgroup_parent: CgroupParent) -> None:
    sup, pids = _start(tmp_path, cgroup_parent)
    record = sup.load_record()
    assert record is not None and record.cgroup is not None and record.cgroup_kind == cgroup_parent.kind
    escaped = pids[-1]
    with open(f"/proc/{escaped}/stat") as fh:
        assert int(fh.read().rsplit(")", 1)[1].split()[3]) == escaped, "the grandchild leads its own session"
    fds = pidfds(pids)
    result = sup.stop()
    assert result.remaining == 0
    wait_all_gone(fds, time.monotonic(), 0.5)  # gone when stop() returned
    assert not Path(record.cgroup).exists(), "the server's cgroup is removed after the stop"
    assert sup.stop_method.startswith(f"cgroup {cgroup_parent.kind} ")


@needs_root
@pytest.mark.parametrize("cgroup_parent", ["v2"], indirect=True)
def test_the_guard_kills_the_whole_cgroup_when_the_daemon_dies(tmp_path: Path, cgroup_parent: CgroupParent) -> None:
    # A daemon stand-in: a child process that runs the supervisor, then is SIGKILLed.
    script = (
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from exporter_watchdog.act.cgroup import parent_at\n"
        "from exporter_watchdog.act.supervisor import Supervisor\n"
        f"sup = Supervisor(Path({str(tmp_path / 'server.json')!r}), Path({str(tmp_path / 'server.log')!r}),"
        f" cgroup_parent=parent_at(Path({str(cgroup_parent.path)!r})))\n"
        f"sup.start([sys.executable, {str(FAULT_SERVER)!r}, '--port', '{free_port()}', '--pids-file',"
        f" {str(tmp_path / 'pids.json')!r}, '--setsid-child', '--scrub-env'], {{'PATH': os.environ['PATH']}},"
        " gpus=[0])\n"
        "print('started', flush=True)\n"
        "time.sleep(3600)\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        assert daemon.stdout is not None and daemon.stdout.readline().strip() == "started"
        pids = server_pids(tmp_path)
        fds = pidfds(pids)
        killed = time.monotonic()
        daemon.send_signal(signal.SIGKILL)
        assert wait_all_gone(fds, killed, 10.0) < 1.0
    finally:
        daemon.kill()
        daemon.wait()


@needs_root
def test_without_a_cgroup_the_marker_free_setsid_child_escapes_the_stop(tmp_path: Path) -> None:
    """Why the cgroup matters: group + session + marker cannot see a child that left all three."""
    sup, pids = _start(tmp_path, None)
    assert sup.stop_method.startswith("process group + session + marker scan")
    sup.stop()
    try:
        assert pid_alive(pids[-1])
    finally:
        os.kill(pids[-1], signal.SIGKILL)


# --- where cgroups may be made, on temp folders -------------------------------------------------------


def _fake_cgroupfs(root: Path, mounts: list[tuple[str, str, str]], own: str = "/") -> tuple[Path, Path]:
    lines = []
    for point, fstype, options in mounts:
        path = root / point
        path.mkdir(parents=True, exist_ok=True)
        (path / "cgroup.procs").write_text("")
        lines.append(f"{fstype} {path} {fstype} {options} 0 0")
    (root / "mounts").write_text("\n".join(lines) + "\n")
    (root / "self_cgroup").write_text(f"0::{own}\n")
    return root / "mounts", root / "self_cgroup"


def test_discovery_prefers_a_delegated_v2_subtree(tmp_path: Path) -> None:
    mounts, own = _fake_cgroupfs(tmp_path, [("v2", "cgroup2", "rw"), ("freezer", "cgroup", "rw,freezer")],
                                 own="/user.slice/app.service")
    service = tmp_path / "v2" / "user.slice" / "app.service"
    service.mkdir(parents=True)
    (service / "cgroup.procs").write_text("")
    # A temp folder is not cgroupfs: a new folder has no cgroup.procs until we give it one.
    target = service / "exporter-watchdog"
    target.mkdir()
    (target / "cgroup.procs").write_text("")
    found = find_parent(mounts_file=mounts, self_cgroup=own)
    assert found == CgroupParent(target, "v2")


def test_discovery_falls_back_to_v1_freezer_then_none(tmp_path: Path) -> None:
    mounts, own = _fake_cgroupfs(tmp_path, [("freezer", "cgroup", "rw,freezer"), ("pids", "cgroup", "rw,pids")])
    (tmp_path / "freezer" / "exporter-watchdog").mkdir()
    (tmp_path / "freezer" / "exporter-watchdog" / "cgroup.procs").write_text("")
    assert find_parent(mounts_file=mounts, self_cgroup=own) == CgroupParent(tmp_path / "freezer" / "exporter-watchdog",
                                                                           "v1-freezer")
    # Nothing usable (no cgroup.procs in what we would create): the supervisor falls back.
    mounts, own = _fake_cgroupfs(tmp_path / "bare", [("cpu", "cgroup", "rw,cpu")])
    assert find_parent(mounts_file=mounts, self_cgroup=own) is None


def test_a_configured_folder_outside_any_cgroup_mount_is_refused(tmp_path: Path) -> None:
    mounts, _ = _fake_cgroupfs(tmp_path, [("cpu", "cgroup", "rw,cpu")])
    with pytest.raises(ValueError, match="not inside a cgroup mount"):
        parent_at(tmp_path / "elsewhere", mounts_file=mounts)
    with pytest.raises(ValueError, match="without the freezer or pids controller"):
        parent_at(tmp_path / "cpu" / "x", mounts_file=mounts)


def test_serve_refuses_a_configured_cgroup_it_cannot_use(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nserver:\n  cgroup: {tmp_path}\n")
    result = subprocess.run([*EXE, "serve", "--demo", "--config", str(config)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert f"server.cgroup = '{tmp_path}': {tmp_path} is not inside a cgroup mount" in result.stderr
    assert not (tmp_path / "state" / "control.sock").exists()
