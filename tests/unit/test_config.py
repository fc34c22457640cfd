"""Config and profile validation: errors name the file, the key and the value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from exporter_watchdog.config import SCHEMA, ConfigError, load_config
from exporter_watchdog.profiles import (
    ProfileError,
    build_launch,
    bundled_models_dir,
    check_runnable,
    find_profile,
    list_profiles,
    load_profile,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config(None)
    assert config.server.port == 8000
    assert config.metrics.listen == "0.0.0.0:9400"
    assert config.slurm.cgroup_root == Path("/sys/fs/cgroup")
    assert config.slurm.scontrol == ("scontrol",)
    assert config.slurm.detect == "inotify" and config.slurm.poll_interval_seconds == 0.25
    assert config.claim.gpus is None and config.claim.cooldown_seconds == 60.0
    assert config.node.name  # the short hostname


def test_example_config_is_valid_and_explains_every_key() -> None:
    example = REPO / "exporter-watchdog.example.yaml"
    config = load_config(example)
    assert config.node.name == "gpu-node-01" and config.claim.gpus == 2
    doc = yaml.safe_load(example.read_text())
    present = set()
    for top, value in doc.items():
        if isinstance(value, dict):
            present |= {f"{top}.{k}" for k in value}
        else:
            present.add(top)
    assert present == set(SCHEMA), f"keys missing from the example: {set(SCHEMA) - present}"


@pytest.mark.parametrize(
    ("text", "key", "value_repr", "problem"),
    [
        ("claim:\n  gpus: two\n", "claim.gpus", "'two'", "expected an integer"),
        ("claim:\n  gpus: 0\n", "claim.gpus", "0", "must be >= 1"),
        ("claim:\n  gpuz: 2\n", "claim.gpuz", "2", "unknown key"),
        ("nodes:\n  name: x\n", "nodes", "{'name': 'x'}", "unknown key"),
        ("server:\n  port: 70000\n", "server.port", "70000", "must be <= 65535"),
        ("server:\n  port: true\n", "server.port", "True", "expected an integer"),
        ("metrics:\n  listen: 9400\n", "metrics.listen", "9400", "HOST:PORT"),
        ("slurm:\n  detect: fanotify\n", "slurm.detect", "'fanotify'", "inotify, poll"),
        ("slurm:\n  timeout_seconds: 0\n", "slurm.timeout_seconds", "0", "must be > 0"),
        ("claim:\n  yield_on_any_job: 'yes'\n", "claim.yield_on_any_job", "'yes'", "true or false"),
        ("node:\n  gpus: 2\nclaim:\n  gpus: 3\n", "claim.gpus", "3", "more than node.gpus"),
        ("server: [1, 2]\n", "server", "[1, 2]", "expected a mapping"),
        ("server:\n  env: {A: [1]}\n", "server.env", "{'A': [1]}", "string or number"),
        ("log:\n  level: loud\n", "log.level", "'loud'", "expected one of"),
    ],
)
def test_errors_name_file_key_and_value(tmp_path: Path, text: str, key: str, value_repr: str, problem: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key} = {value_repr}: "), message
    assert problem in message


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "claim: [\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_command_line_overrides_are_validated_too(tmp_path: Path) -> None:
    config = load_config(None, {"metrics.listen": "127.0.0.1:0"})
    assert config.metrics.listen == "127.0.0.1:0"
    with pytest.raises(ConfigError, match=r"\(command line\): metrics.listen = 'nope'"):
        load_config(None, {"metrics.listen": "nope"})


def test_scontrol_as_string_or_list(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "slurm:\n  scontrol: /opt/slurm/bin/scontrol -M c1\n")).slurm.scontrol == (
        "/opt/slurm/bin/scontrol", "-M", "c1")
    assert load_config(write(tmp_path, "slurm:\n  scontrol: [a, b]\n")).slurm.scontrol == ("a", "b")


# --- profiles -------------------------------------------------------------------------------------


def test_shipped_profiles_are_valid() -> None:
    names = {p.stem for p in list_profiles(bundled_models_dir())}
    assert {"glm-4.7-flash", "minimax-m2.5", "qwen3-coder-fp8", "demo"} <= names
    for path in list_profiles(bundled_models_dir()):
        load_profile(path)


def test_glm_profile_command_line_owns_tp_and_visible_devices() -> None:
    config = load_config(None)
    profile = find_profile(bundled_models_dir(), "glm-4.7-flash")
    launch = build_launch(profile, config, (2, 3))
    argv = list(launch.argv)
    assert argv[:3] == ["vllm", "serve", "zai-org/GLM-4.7-Flash"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    assert argv.count("--tensor-parallel-size") == 1
    assert argv[argv.index("--served-model-name") + 1] == "glm-4.7-flash"
    flags = ("--speculative-config.method", "--tool-call-parser", "--reasoning-parser", "--enable-auto-tool-choice")
    for flag in flags:
        assert flag in argv
    assert argv[argv.index("--speculative-config.method") + 1] == "mtp"
    assert argv[argv.index("--tool-call-parser") + 1] == "glm47"
    assert argv[argv.index("--reasoning-parser") + 1] == "glm45"
    assert launch.env_changes["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert launch.env_changes["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert launch.health_url == "http://127.0.0.1:8000/health"


def test_profile_may_not_set_what_the_daemon_owns(tmp_path: Path) -> None:
    path = write(tmp_path, "model: m\nargs: ['--tensor-parallel-size=8']\n", "bad.yaml")
    with pytest.raises(ProfileError, match=r"bad.yaml: args = '--tensor-parallel-size=8': remove it"):
        load_profile(path)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("model: m\nfoo: 1\n", "foo = 1: unknown key"),
        ("args: []\n", "model = None"),
        ("model: m\nrequires: {cuda: twelve}\n", "requires.cuda = 'twelve'"),
        ("model: m\nname: other\n", "name = 'other': must match the file name"),
        ("model: m\nhealth_path: health\n", "health_path = 'health'"),
    ],
)
def test_bad_profiles(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ProfileError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_profile(write(tmp_path, text, "p.yaml"))


def test_fp8_profiles_refuse_a_node_without_cuda_12_8(tmp_path: Path) -> None:
    old = tmp_path / "cuda-12.4"
    old.mkdir()
    (old / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.4.1"}}')
    new = tmp_path / "cuda-12.8"
    new.mkdir()
    (new / "version.json").write_text('{"cuda": {"name": "CUDA SDK", "version": "12.8.0"}}')
    for name in ("qwen3-coder-fp8", "minimax-m2.5"):
        profile = find_profile(bundled_models_dir(), name)
        config = load_config(write(tmp_path, f"cuda:\n  home: {old}\n"))
        why = check_runnable(profile, config, 4)
        assert why is not None and "needs CUDA >= 12.8" in why and "12.4.1" in why
        config = load_config(write(tmp_path, f"cuda:\n  home: {new}\n  library_paths: [/opt/x]\n"))
        assert check_runnable(profile, config, 4) is None
        launch = build_launch(profile, config, (0, 1, 2, 3))
        assert launch.env_changes["CUDA_HOME"] == str(new)
        assert launch.env_changes["LD_LIBRARY_PATH"].startswith(f"{new}/lib64:/opt/x")
        assert launch.env_changes["PATH"].startswith(f"{new}/bin:")


def test_demo_profile_runs_the_stub_with_this_python() -> None:
    import sys

    config = load_config(None, {"server.port": 8123})
    launch = build_launch(find_profile(bundled_models_dir(), "demo"), config, (1,))
    assert launch.argv[:3] == (sys.executable, "-m", "exporter_watchdog.demo.llm")
    assert "--port" in launch.argv and "8123" in launch.argv
    assert launch.env_changes["CUDA_VISIBLE_DEVICES"] == "1"


def test_bench_defaults_come_from_the_config(tmp_path: Path) -> None:
    import argparse

    from exporter_watchdog.bench.command import defaults_from_config

    key = tmp_path / "key"
    key.write_text("sk-test\n")
    path = write(tmp_path, f"server:\n  port: 8111\n  host: 0.0.0.0\n  api_key_file: {key}\n"
                           "tunnel:\n  hostname: llm.example.org\n")
    args = argparse.Namespace(config=str(path), url=None, api_key=None, tunnel_url=None)
    defaults_from_config(args)
    assert args.url == "http://127.0.0.1:8111" and args.api_key == "sk-test"
    assert args.tunnel_url == "https://llm.example.org"
    given = argparse.Namespace(config=str(path), url="http://x:1", api_key="k", tunnel_url=None)
    defaults_from_config(given)
    assert given.url == "http://x:1" and given.api_key == "k"
