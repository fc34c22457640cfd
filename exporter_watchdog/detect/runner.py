"""The narrow interface for running a command: real subprocesses here, fakes in tests and the demo node."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# After the group is killed its pipes close at once; this only bounds the wait for a process that
# left the group (setsid) and still holds our pipes open.
_DRAIN_SECONDS = 1.0


@dataclass(frozen=True)
class CommandResult:
    """What a finished command returned."""

    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    """Runs argv and returns its result; raises TimeoutError when it runs past `timeout` seconds."""

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult: ...


def run_command(argv: Sequence[str], timeout: float) -> CommandResult:
    """Run argv in its own process group; on timeout kill the whole group and raise TimeoutError."""
    # The environment passes through unchanged so SLURM_CONF reaches scontrol. A new session makes
    # the command the leader of its own group: a timeout kills it and everything it started.
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:
            proc.communicate(timeout=_DRAIN_SECONDS)
        except subprocess.TimeoutExpired:
            # A descendant escaped the group and holds the pipes: stop reading, reap the leader.
            _close_pipes(proc)
            proc.wait()
        raise TimeoutError(f"{argv[0]} did not finish within {timeout:g} s") from None
    except BaseException:
        _kill_group(proc.pid)
        proc.wait()
        raise
    return CommandResult(proc.returncode, stdout, stderr)


def _kill_group(pgid: int) -> None:
    """SIGKILL every process of the group; a group that is already gone is fine."""
    # Only called before the leader is reaped: its pid (the group id) cannot have been reused yet.
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _close_pipes(proc: subprocess.Popen[str]) -> None:
    """Close our ends of the child's pipes."""
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
