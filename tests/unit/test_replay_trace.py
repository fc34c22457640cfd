"""Trace parsers (sacct -P, CSV, sinfo), the learned start rule in the core, and the replay command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter_watchdog.cli import main
from exporter_watchdog.core.decide import decide, learned_delay, next_wake
from exporter_watchdog.core.model import Observation, Phase, Policy, ServerObs, StartRule, StartServer, State
from exporter_watchdog.replay.trace import (
    TraceError,
    gpus_in_tres,
    gres_gpus,
    parse_csv,
    parse_sacct,
    read_sinfo,
    split_gpus,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sacct"


@pytest.mark.parametrize(("tres", "gpus"), [
    ("billing=1,cpu=1,mem=500M,node=1", 0),
    ("cpu=2,gres/gpu=2,node=1", 2),
    ("cpu=2,gres/gpu:a100=3,node=1", 3),
    ("cpu=2,gres/gpu:a30=2,gres/gpu=2,node=1", 2),  # typed and untyped: the untyped total, not twice
    ("gres/gpu:a100=2,gres/gpu:v100=1", 3),
])
def test_gpus_in_tres(tres: str, gpus: int) -> None:
    assert gpus_in_tres(tres) == gpus


def test_split_gpus_spreads_the_total_over_nodes() -> None:
    assert split_gpus(8, 2) == (4, 4)
    assert split_gpus(3, 2) == (2, 1)
    assert split_gpus(0, 3) == (0, 0, 0)


def test_sacct_lines_of_every_kind() -> None:
    trace = parse_sacct([
        "JobID|NodeList|AllocTRES|Start|End|State",
        "10|gpu[001-002,007]|cpu=3,gres/gpu:a100=6,node=3|2026-10-01T00:00:00|2026-10-01T01:00:00|COMPLETED",
        "10.batch|gpu001|cpu=1|2026-10-01T00:00:00|2026-10-01T01:00:00|COMPLETED",
        "11_3|gpu004|gres/gpu=1|2026-10-01T00:10:00|Unknown|RUNNING",
        "11_[4-9]|None assigned||Unknown|Unknown|PENDING",
        "12|None assigned||None|2026-10-01T00:20:00|CANCELLED by 0",
        "13|gpu005|cpu=1,mem=1G,node=1|2026-10-01T00:00:00|2026-10-01T00:00:00|FAILED",
        "14|gpu005|cpu=1,mem=1G,node=1|2026-10-01T00:00:09|2026-10-01T00:00:00|FAILED",
    ], "t.sacct")
    assert [(j.job_id, j.nodes, j.gpus, j.end is None) for j in trace.jobs] == [
        ("10", ("gpu001", "gpu002", "gpu007"), (2, 2, 2), False),
        ("11_3", ("gpu004",), (1,), True),
        ("13", ("gpu005",), (0,), False),  # ran under a second: sacct prints the same Start and End
    ]
    assert trace.jobs[0].end is not None and trace.jobs[0].end - trace.jobs[0].start == 3600
    assert trace.skipped == {"job steps (run sacct with -X)": 1,
                             "never started (pending, or cancelled before start)": 2, "ends before it starts": 1}


def test_sacct_without_header_and_with_trailing_separator() -> None:
    trace = parse_sacct(["5|n1|gres/gpu=1|100|200|COMPLETED|"])
    assert trace.jobs[0].start == 100 and trace.jobs[0].end == 200


@pytest.mark.parametrize(("line", "problem"), [
    ("7|n1|gres/gpu=1|yesterday|2026-10-01T00:00:00|COMPLETED", "bad Start/End time"),
    ("7|n[1-|gres/gpu=1|100|200|COMPLETED", "bad NodeList"),
    ("7|n1|100", "fields"),
])
def test_sacct_errors_name_file_line_and_value(line: str, problem: str) -> None:
    with pytest.raises(TraceError, match=rf"t\.sacct: line 2: .*{problem}"):
        parse_sacct(["JobID|NodeList|AllocTRES|Start|End|State", line], "t.sacct")


def test_csv_trace() -> None:
    trace = parse_csv(["job_id,nodes,gpus,start,end", "a,n[1-2],4,0,60", "b,n3,1,2026-10-01T00:00:00,"], "t.csv")
    assert [(j.job_id, j.nodes, j.gpus, j.end) for j in trace.jobs] == [
        ("a", ("n1", "n2"), (4, 4), 60.0), ("b", ("n3",), (1,), None)]
    with pytest.raises(TraceError, match="t.csv: line 2: 'x': gpus"):
        parse_csv(["job_id,nodes,gpus,start,end", "a,n1,x,0,1"], "t.csv")


def test_sinfo_dump(tmp_path: Path) -> None:
    path = tmp_path / "nodes.txt"
    path.write_text("NODELIST GRES\ngpu[001-002] gpu:a100:8(S:0-1)\ncpu1 (null)\ngpu003 gpu:4,gpu:v100:2\n")
    assert read_sinfo(path) == {"gpu001": 8, "gpu002": 8, "cpu1": 0, "gpu003": 6}
    assert gres_gpus("gpu:a100:8(S:0-1)") == 8


def test_learned_delay_by_hand() -> None:
    assert learned_delay([10, 20, 30], 100) == 0  # too few gaps to judge
    assert learned_delay([500, 600, 700, 800, 900], 100) == 0  # every gap outlasts the cold start
    # Gaps 10,10,10,500,600: waiting 10 s leaves 490, 590 (median 590 >= 100).
    assert learned_delay([10, 10, 10, 500, 600], 100) == 10
    assert learned_delay([30] * 5, 100) == 30  # nothing ever outlasts it: wait the longest gap seen


def test_learned_rule_waits_in_the_core_and_names_its_wake_time() -> None:
    policy = Policy(claim_gpus=1, start_rule=StartRule.LEARNED, cold_start_seconds=100)
    state = State(recent_gaps=(10.0, 10.0, 10.0, 500.0, 600.0))
    free = Observation(node_gpus=2, jobs=(), server=ServerObs())
    state, actions = decide(state, free, 1000.0, policy)
    assert actions == [] and state.phase == Phase.IDLE and state.gap_since == 1000.0
    assert next_wake(state, policy) == 1010.0
    state, actions = decide(state, free, 1010.0, policy)
    assert actions == [StartServer(gpus=(1,))]
    # The same state under `always` starts at once.
    assert decide(State(recent_gaps=(10.0,) * 5), free, 0.0, Policy(claim_gpus=1))[1] == [StartServer(gpus=(1,))]


def test_replay_command_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("job_id,nodes,gpus,start,end\na,n1,4,0,100\nb,n1,4,150,400\nc,n1,4,990,1000\n")
    code = main(["replay", str(trace), "--gpus-per-node", "4", "--cold-start", "100", "--stop", "0",
                 "--claim", "2", "--cooldown", "60", "--json", "--workers", "1"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    summary = doc["summary"]
    # Start 100 wasted by b at 150; after b, cool-down to 460, ready 560, harvest to 990.
    assert summary["harvested_gpu_hours"] == pytest.approx(2 * 430 / 3600, abs=1e-3)
    assert (summary["starts"], summary["yields"], summary["wasted_starts"]) == (2, 2, 1)
    assert doc["nodes"][0]["node"] == "n1"


def test_replay_sweep_writes_the_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("job_id,nodes,gpus,start,end\na,n1,4,0,100\nb,n1,1,500,900\nc,n1,4,990,1000\n")
    svg = tmp_path / "plot" / "sweep.svg"
    code = main(["replay", str(trace), "--gpus-per-node", "4", "--cold-start", "100", "--workers", "1",
                 "--sweep", "cooldown=0,60,300", "claim=1,4", "--svg", str(svg)])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count(" always ") == 6
    text = svg.read_text()
    assert text.startswith("<svg") and "claim 1" in text and "claim 4" in text and "wasted starts" in text


@pytest.mark.parametrize(("argv", "message"), [
    (["--gpus-per-node", "4"], "no cold start known"),
    (["--cold-start", "10"], "--sinfo FILE"),
    (["--cold-start", "10", "--gpus-per-node", "4", "--sweep", "colour=1"], "KEY=V1,V2"),
    (["--cold-start", "-1", "--gpus-per-node", "4"], "--cold-start -1: must be >= 0"),
])
def test_replay_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                    message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXPORTER_WATCHDOG_CONFIG", str(tmp_path / "none.yaml"))
    (tmp_path / "none.yaml").write_text("server:\n  profile: null\n")
    trace = tmp_path / "t.csv"
    trace.write_text("job_id,nodes,gpus,start,end\na,n1,4,0,100\n")
    assert main(["replay", str(trace), *argv]) == 2
    assert message in capsys.readouterr().err


def test_replay_bad_trace_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.txt"
    trace.write_text("hello world\n")
    assert main(["replay", str(trace), "--cold-start", "1", "--gpus-per-node", "1"]) == 2
    assert f"{trace}: line 1" in capsys.readouterr().err


def test_serve_policy_takes_the_start_rule_and_cold_start(tmp_path: Path) -> None:
    from exporter_watchdog.config import load_config
    from exporter_watchdog.daemon import policy_from
    from exporter_watchdog.profiles import load_profile

    profile_path = tmp_path / "m.yaml"
    profile_path.write_text("name: m\nmodel: org/m\ncold_start_seconds: 240\n")
    profile = load_profile(profile_path)
    config_path = tmp_path / "c.yaml"
    config_path.write_text("claim:\n  start_rule: learned\n")
    policy = policy_from(load_config(config_path), 4, profile)
    assert (policy.start_rule, policy.cold_start_seconds) == (StartRule.LEARNED, 240.0)
    config_path.write_text("claim:\n  start_rule: learned\nserver:\n  cold_start_seconds: 90\n")
    assert policy_from(load_config(config_path), 4, profile).cold_start_seconds == 90.0
    config_path.write_text("claim:\n  start_rule: sometimes\n")
    with pytest.raises(Exception, match="claim.start_rule = 'sometimes': expected one of always, learned"):
        load_config(config_path)


def test_replay_defaults_to_the_cold_start_the_daemon_measured(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from exporter_watchdog.act.statefile import record_cold_start

    config = tmp_path / "c.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nserver:\n  profile: demo\n")
    trace = tmp_path / "t.csv"
    trace.write_text("job_id,nodes,gpus,start,end\na,n1,4,0,100\nb,n1,4,1000,1001\n")
    record_cold_start(tmp_path / "state", "demo", 250.0)
    assert main(["replay", str(trace), "-c", str(config), "--gpus-per-node", "4", "--claim", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["settings"]["cold_start"] == 250.0
    # Free from 100 to 1000, ready 250 s after the start: 4 GPUs x 650 s.
    assert doc["summary"]["harvested_gpu_hours"] == pytest.approx(4 * 650 / 3600, abs=1e-3)
