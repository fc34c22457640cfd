"""`exporter-watchdog targets`: sinfo's node list -> Prometheus file_sd target groups."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from exporter_watchdog import targets
from exporter_watchdog.detect.runner import CommandResult


class FakeSinfo:
    """Stands in for the command runner: answers with canned sinfo output and records the argv."""

    def __init__(self, stdout: str = "", returncode: int = 0, stderr: str = "", error: Exception | None = None):
        self.result = CommandResult(returncode, stdout, stderr)
        self.error = error
        self.calls: list[list[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        self.calls.append(list(argv))
        if self.error is not None:
            raise self.error
        return self.result


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="exporter-watchdog")
    targets.register(parser.add_subparsers(dest="command"))
    return parser.parse_args(["targets", *argv])


# sinfo --Node lists a node once per partition it belongs to.
SINFO_TWO_PARTITIONS = "gpu-a1\ngpu-a2\ngpu-a1\ngpu-b10\n\n"


def test_each_node_gets_a_daemon_and_a_server_target_with_its_node_label() -> None:
    groups = targets.build_targets(["n1", "n2"], server_port=8100)
    assert groups == [
        {"targets": ["n1:9400"], "labels": {"job": "exporter-watchdog", "node": "n1"}},
        {"targets": ["n1:8100"], "labels": {"job": "vllm", "node": "n1"}},
        {"targets": ["n2:9400"], "labels": {"job": "exporter-watchdog", "node": "n2"}},
        {"targets": ["n2:8100"], "labels": {"job": "vllm", "node": "n2"}},
    ]


def test_tunnel_and_slurm_exporter_targets_are_added_when_asked() -> None:
    groups = targets.build_targets(["n1"], tunnel_metrics_port=20241, slurm_exporters=["head:9341"])
    jobs = [(g["labels"]["job"], g["targets"]) for g in groups]
    assert ("cloudflared", ["n1:20241"]) in jobs
    assert ("slurm-exporter", ["head:9341"]) in jobs
    # The Slurm exporter is the cluster's, not a node's.
    assert "node" not in groups[-1]["labels"]


def test_nodes_are_listed_once_in_sinfo_order() -> None:
    assert targets.parse_nodes(SINFO_TWO_PARTITIONS) == ["gpu-a1", "gpu-a2", "gpu-b10"]


def test_a_line_that_is_not_a_node_name_is_an_error_naming_the_line() -> None:
    with pytest.raises(targets.TargetsError, match=r"line 2: 'n2 extra'"):
        targets.parse_nodes("n1\nn2 extra\n")


def test_writes_the_file_from_sinfo_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "exporter-watchdog.json"
    sinfo = FakeSinfo(SINFO_TWO_PARTITIONS)
    args = parse(["-o", str(out), "--server-port", "8001", "--partition", "gpu"])
    assert args.func is targets.run

    assert targets.run(args, runner=sinfo) == 0

    assert sinfo.calls == [["sinfo", "--noheader", "--Node", "--format=%N", "--partition=gpu"]]
    groups = json.loads(out.read_text())
    daemon = [g["targets"][0] for g in groups if g["labels"]["job"] == "exporter-watchdog"]
    server = [g["targets"][0] for g in groups if g["labels"]["job"] == "vllm"]
    assert daemon == ["gpu-a1:9400", "gpu-a2:9400", "gpu-b10:9400"]
    assert server == ["gpu-a1:8001", "gpu-a2:8001", "gpu-b10:8001"]
    assert all(g["labels"]["node"] == g["targets"][0].split(":")[0] for g in groups)
    assert "3 node(s)" in capsys.readouterr().err
    # Written through a temporary file that is renamed: nothing else is left in the folder.
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_stdout_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert targets.run(parse([]), runner=FakeSinfo("n7\n")) == 0
    groups = json.loads(capsys.readouterr().out)
    assert [g["targets"] for g in groups] == [["n7:9400"], ["n7:8000"]]


def test_a_rewrite_replaces_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    assert targets.run(parse(["-o", str(out)]), runner=FakeSinfo("a\nb\n")) == 0
    assert targets.run(parse(["-o", str(out)]), runner=FakeSinfo("c\n")) == 0
    assert {g["labels"]["node"] for g in json.loads(out.read_text())} == {"c"}


@pytest.mark.parametrize(
    ("sinfo", "message"),
    [
        (FakeSinfo("", returncode=1, stderr="slurm_load_partitions: Unable to contact slurm controller"),
         "exit code 1: slurm_load_partitions: Unable to contact slurm controller"),
        (FakeSinfo("\n"), "sinfo listed no nodes"),
        (FakeSinfo(error=FileNotFoundError("sinfo")), "sinfo not found"),
        (FakeSinfo(error=TimeoutError()), "did not answer within"),
    ],
)
def test_sinfo_failures_exit_non_zero_and_keep_the_old_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], sinfo: FakeSinfo, message: str
) -> None:
    out = tmp_path / "t.json"
    out.write_text("previous")
    assert targets.run(parse(["-o", str(out)]), runner=sinfo) == 1
    assert message in capsys.readouterr().err
    assert out.read_text() == "previous"


def test_an_unwritable_output_names_the_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "missing-dir" / "t.json"
    assert targets.run(parse(["-o", str(out)]), runner=FakeSinfo("n1\n")) == 1
    assert f"cannot write {out}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--server-port", "0"], ["--daemon-port", "http"], ["--slurm-exporter", "head"], ["--slurm-exporter", "h:99999"]],
)
def test_bad_options_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(argv)
    assert exc.value.code == 2
    assert argv[1] in capsys.readouterr().err


def test_node_addr_scrapes_each_node_at_its_slurm_nodeaddr(capsys: pytest.CaptureFixture[str]) -> None:
    sinfo = FakeSinfo("pod1 pod1.runpod.internal\npod2 10.0.0.7\npod1 pod1.runpod.internal\n")
    assert targets.run(parse(["--node-addr"]), runner=sinfo) == 0
    groups = json.loads(capsys.readouterr().out)
    daemons = [g for g in groups if g["labels"]["job"] == "exporter-watchdog"]
    assert daemons == [
        {"targets": ["pod1.runpod.internal:9400"], "labels": {"job": "exporter-watchdog", "node": "pod1"}},
        {"targets": ["10.0.0.7:9400"], "labels": {"job": "exporter-watchdog", "node": "pod2"}},
    ]
    assert sinfo.calls[0][-1] == "--format=%N %o"
    with pytest.raises(targets.TargetsError, match="line 1"):
        targets.parse_node_addrs("pod1\n", with_addr=True)


def test_domain_scrapes_each_node_at_name_dot_suffix(capsys: pytest.CaptureFixture[str]) -> None:
    assert targets.run(parse(["--domain", "runpod.internal"]), runner=FakeSinfo("pod1\npod2\n")) == 0
    groups = json.loads(capsys.readouterr().out)
    assert [g["targets"][0] for g in groups if g["labels"]["job"] == "exporter-watchdog"] == [
        "pod1.runpod.internal:9400", "pod2.runpod.internal:9400"]
    with pytest.raises(SystemExit):
        parse(["--domain", "bad domain"])
