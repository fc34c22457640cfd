"""Model profiles (models/*.yaml) and the exact command line and environment a server runs with."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from exporter_watchdog.config import Config, ConfigError

PROFILE_KEYS = {
    "name", "description", "model", "served_model_name", "requires", "args", "env", "command",
    "health_path", "startup_timeout_seconds", "tensor_parallel", "cold_start_seconds",
}
REQUIRES_KEYS = {"cuda", "min_gpus"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# vLLM spellings of the options the daemon owns: it always sets them itself.
OWNED_FLAGS = {
    "--tensor-parallel-size": "tensor parallel size is the claimed GPU count",
    "-tp": "tensor parallel size is the claimed GPU count",
    "--port": "the port comes from server.port",
    "--host": "the host comes from server.host",
}


class ProfileError(Exception):
    """A profile problem, naming the file, key and value (like ConfigError)."""


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    model: str
    description: str = ""
    served_model_name: str | None = None
    requires_cuda: str | None = None
    min_gpus: int = 1
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    command: tuple[str, ...] | None = None  # a whole command for servers other than vLLM
    health_path: str = "/health"
    startup_timeout_seconds: float = 900.0
    tensor_parallel: bool = True  # add --tensor-parallel-size (vLLM); command profiles use {tp}
    cold_start_seconds: float | None = None  # measured start-to-ready time on this hardware, if known


@dataclass(frozen=True)
class LaunchSpec:
    """What the supervisor runs: argv, the variables the daemon sets, and where to probe health."""

    argv: tuple[str, ...]
    env_changes: Mapping[str, str]
    health_url: str
    startup_timeout_seconds: float

    def full_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env.update(self.env_changes)
        return env


def bundled_models_dir() -> Path:
    """models/ of a source checkout, or the copy packed into the wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "models", here / "_models"):
        if candidate.is_dir():
            return candidate
    return here.parent / "models"


def models_dir(config: Config) -> Path:
    return config.server.models_dir or bundled_models_dir()


def _err(path: Path, key: str, value: object, problem: str) -> ProfileError:
    return ProfileError(f"{path}: {key} = {value!r}: {problem}")


def _strings(path: Path, key: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise _err(path, key, value, "expected a list of strings")
    return tuple(str(v) for v in value)


def parse_version(text: str) -> tuple[int, ...]:
    """'12.8' -> (12, 8); raises ValueError on anything else."""
    if not re.fullmatch(r"\d+(\.\d+){0,2}", text.strip()):
        raise ValueError(f"not a version: {text!r}")
    return tuple(int(p) for p in text.strip().split("."))


def load_profile(path: Path) -> Profile:
    """Read and validate one profile file."""
    try:
        doc: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise _err(path, "(top level)", doc, "expected a mapping")
    for key in doc:
        if key not in PROFILE_KEYS:
            raise _err(path, str(key), doc[key], f"unknown key (known: {', '.join(sorted(PROFILE_KEYS))})")
    name = doc.get("name", path.stem)
    if name != path.stem:
        raise _err(path, "name", name, f"must match the file name ({path.stem})")
    model = doc.get("model")
    if not isinstance(model, str) or not model:
        raise _err(path, "model", model, "expected the model id or path")
    requires = doc.get("requires") or {}
    if not isinstance(requires, dict):
        raise _err(path, "requires", requires, "expected a mapping")
    for key in requires:
        if key not in REQUIRES_KEYS:
            raise _err(path, f"requires.{key}", requires[key], "unknown key (known: cuda, min_gpus)")
    cuda = requires.get("cuda")
    if cuda is not None:
        try:
            parse_version(str(cuda))
        except ValueError:
            raise _err(path, "requires.cuda", cuda, "expected a version like 12.8") from None
        cuda = str(cuda)
    min_gpus = requires.get("min_gpus", 1)
    if isinstance(min_gpus, bool) or not isinstance(min_gpus, int) or min_gpus < 1:
        raise _err(path, "requires.min_gpus", min_gpus, "expected an integer >= 1")
    args = _strings(path, "args", doc.get("args", []))
    for arg in args:
        flag = arg.split("=", 1)[0]
        if flag in OWNED_FLAGS:
            raise _err(path, "args", arg, f"remove it: {OWNED_FLAGS[flag]}")
    env = doc.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) for k in env):
        raise _err(path, "env", env, "expected a mapping of NAME: value")
    command = doc.get("command")
    if command is not None:
        command = _strings(path, "command", command)
        if not command:
            raise _err(path, "command", [], "the command is empty")
    health = doc.get("health_path", "/health")
    if not isinstance(health, str) or not health.startswith("/"):
        raise _err(path, "health_path", health, "expected a path starting with /")
    timeout = doc.get("startup_timeout_seconds", 900)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise _err(path, "startup_timeout_seconds", timeout, "expected a number of seconds > 0")
    cold = doc.get("cold_start_seconds")
    if cold is not None and (isinstance(cold, bool) or not isinstance(cold, (int, float)) or cold < 0):
        raise _err(path, "cold_start_seconds", cold, "expected a number of seconds >= 0")
    tp = doc.get("tensor_parallel", command is None)
    if not isinstance(tp, bool):
        raise _err(path, "tensor_parallel", tp, "expected true or false")
    served = doc.get("served_model_name")
    if served is not None and (not isinstance(served, str) or not served):
        raise _err(path, "served_model_name", served, "expected a string")
    return Profile(
        name=name, path=path, model=model, description=str(doc.get("description", "")).strip(),
        served_model_name=served, requires_cuda=cuda, min_gpus=min_gpus, args=args,
        env={k: str(v) for k, v in env.items()}, command=command, health_path=health,
        startup_timeout_seconds=float(timeout), tensor_parallel=tp,
        cold_start_seconds=None if cold is None else float(cold),
    )


def list_profiles(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if NAME_RE.match(p.stem))


def find_profile(directory: Path, name: str) -> Profile:
    if not NAME_RE.match(name):
        raise ProfileError(f"{name!r} is not a profile name")
    path = directory / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(p.stem for p in list_profiles(directory)) or "none"
        raise ProfileError(f"no profile {name!r} in {directory} (profiles: {known})")
    return load_profile(path)


def node_cuda_version(config: Config) -> tuple[str | None, str]:
    """The CUDA toolkit version the server would run with, and where that came from."""
    if config.cuda.version:
        return config.cuda.version, f"{config.source}: cuda.version"
    homes = [config.cuda.home] if config.cuda.home else []
    homes.append(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")))
    for home in homes:
        if home is None:
            continue
        vfile = home / "version.json"
        try:
            data = json.loads(vfile.read_text())
            return str(data["cuda"]["version"]), str(vfile)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        tfile = home / "version.txt"
        try:
            match = re.search(r"(\d+\.\d+(\.\d+)?)", tfile.read_text())
            if match:
                return match.group(1), str(tfile)
        except OSError:
            pass
    return None, "no cuda.version set and no version.json under cuda.home or /usr/local/cuda"


def check_runnable(profile: Profile, config: Config, gpus: int | None = None) -> str | None:
    """Why this profile cannot run on this node, or None when it can."""
    if profile.requires_cuda:
        have, where = node_cuda_version(config)
        need = parse_version(profile.requires_cuda)
        try:
            ok = have is not None and parse_version(have) >= need
        except ValueError:
            ok = False
        if not ok:
            return (
                f"profile {profile.name} needs CUDA >= {profile.requires_cuda} ({profile.path}: requires.cuda);"
                f" this node has {have or 'no known CUDA'} ({where}); point cuda.home at a CUDA"
                f" {profile.requires_cuda}+ toolkit or set cuda.version"
            )
    if gpus is not None and gpus < profile.min_gpus:
        return (
            f"profile {profile.name} needs at least {profile.min_gpus} GPUs ({profile.path}: requires.min_gpus);"
            f" claim.gpus gives {gpus}"
        )
    return None


def _api_key(config: Config) -> str | None:
    if config.server.api_key_file is None:
        return None
    try:
        key = config.server.api_key_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(config.source, "server.api_key_file", str(config.server.api_key_file),
                          f"cannot read: {exc.strerror}") from None
    if not key:
        raise ConfigError(config.source, "server.api_key_file", str(config.server.api_key_file), "the file is empty")
    return key


def build_launch(profile: Profile, config: Config, gpus: Sequence[int]) -> LaunchSpec:
    """The command line and environment for `profile` on the GPUs `gpus`."""
    tp = len(gpus)
    host, port = config.server.host, config.server.port
    served = profile.served_model_name or profile.name
    if profile.command is not None:
        values = {
            "model": profile.model, "port": str(port), "host": host, "tp": str(tp),
            "gpus": ",".join(map(str, gpus)), "served_model_name": served, "python": sys.executable,
        }
        try:
            argv = [part.format(**values) for part in profile.command]
        except (KeyError, IndexError, ValueError) as exc:
            raise ProfileError(f"{profile.path}: command: unknown placeholder {exc}") from None
        argv += list(profile.args)
        if profile.tensor_parallel:
            argv += ["--tensor-parallel-size", str(tp)]
    else:
        argv = ["vllm", "serve", profile.model, "--host", host, "--port", str(port),
                "--served-model-name", served, *profile.args, "--tensor-parallel-size", str(tp)]
    argv += list(config.server.extra_args)

    env: dict[str, str] = {}
    env.update(config.server.env)
    env.update(profile.env)
    if config.cuda.home:
        home = str(config.cuda.home)
        env["CUDA_HOME"] = home
        env["PATH"] = f"{home}/bin:{os.environ.get('PATH', '/usr/bin:/bin')}"
        libs = [f"{home}/lib64", *map(str, config.cuda.library_paths)]
    else:
        libs = [str(p) for p in config.cuda.library_paths]
    if libs:
        old = os.environ.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = ":".join(libs + ([old] if old else []))
    key = _api_key(config)
    if key:
        env["VLLM_API_KEY"] = key
    # Slurm and NVML count GPUs in PCI bus order; CUDA's default order may differ.
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    timeout = config.server.startup_timeout_seconds or profile.startup_timeout_seconds
    return LaunchSpec(
        argv=tuple(argv), env_changes=env, health_url=f"http://{probe_host}:{port}{profile.health_path}",
        startup_timeout_seconds=timeout,
    )
