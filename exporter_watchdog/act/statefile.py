"""Small JSON files in the state dir, written atomically: the active profile survives restarts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

ACTIVE_PROFILE = "active-profile.json"


def ensure_state_dir(path: Path) -> Path:
    """Create the state dir readable only by its owner (it holds the control socket)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def write_json(path: Path, data: Any) -> None:
    """Replace `path` atomically, so a crash never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> Any | None:
    """The file's JSON, or None when it is missing or unreadable (a stale or torn file is ignored)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def active_profile(state_dir: Path, config_profile: str | None) -> str | None:
    """The profile `switch` chose, unless the config's server.profile changed since (the config wins then)."""
    data = read_json(state_dir / ACTIVE_PROFILE)
    if isinstance(data, dict) and isinstance(data.get("profile"), str):
        if data.get("config_profile") == config_profile:
            return str(data["profile"])
    return config_profile


def set_active_profile(state_dir: Path, profile: str, config_profile: str | None) -> None:
    write_json(state_dir / ACTIVE_PROFILE, {"profile": profile, "config_profile": config_profile})


COLD_STARTS = "cold-starts.json"


def record_cold_start(state_dir: Path, profile: str, seconds: float) -> None:
    """Keep the last measured start-to-ready time per profile (read by `replay`)."""
    data = read_json(state_dir / COLD_STARTS)
    known = data if isinstance(data, dict) else {}
    known[profile] = round(seconds, 3)
    write_json(state_dir / COLD_STARTS, known)


def measured_cold_start(state_dir: Path, profile: str) -> float | None:
    """The last measured start-to-ready time of `profile`, or None."""
    data = read_json(state_dir / COLD_STARTS)
    value = data.get(profile) if isinstance(data, dict) else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
