"""The shipped Prometheus and Alertmanager files pass promtool and amtool, and every alert has tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from exporter_watchdog import targets
from tests.conftest_slurm import slurm_cluster, slurm_cluster_module  # noqa: F401  (fixtures)
from tests.support.prom import PROMETHEUS_DIR, REPO, require_binaries, run_tool
from tests.support.slurm_cluster import SlurmCluster

pytestmark = pytest.mark.prometheus

RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))
ALERTMANAGER = PROMETHEUS_DIR / "alertmanager.yml"
SEVERITIES = {"critical", "warning", "info"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _alert_rules() -> list[dict[str, Any]]:
    return [
        rule for path in RULE_FILES for group in _yaml(path)["groups"] for rule in group["rules"] if "alert" in rule
    ]


def _ok(proc: Any) -> None:
    assert proc.returncode == 0, f"{' '.join(proc.args)} failed:\n{proc.stdout}"


def test_promtool_check_config_with_the_rules_and_a_generated_targets_file(tmp_path: Path) -> None:
    tools = require_binaries("promtool")
    work = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, work)
    # The file `exporter-watchdog targets` writes, and the example: promtool validates file_sd files.
    groups = targets.build_targets(["n1", "n2"], tunnel_metrics_port=20241, slurm_exporters=["head:9341"])
    (work / "targets" / "exporter-watchdog.json").write_text(targets.render(groups))
    shutil.copy(work / "targets.example.json", work / "targets" / "example.json")
    proc = run_tool([tools["promtool"], "check", "config", str(work / "prometheus.yml")])
    _ok(proc)
    assert f"{len(RULE_FILES)} rule files found" in proc.stdout


@pytest.mark.slurm
def test_targets_written_from_a_real_sinfo_pass_promtool(
    slurm_cluster: SlurmCluster, tmp_path: Path,  # noqa: F811 (the fixture)
) -> None:
    tools = require_binaries("promtool")
    work = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, work)
    out = work / "targets" / "exporter-watchdog.json"
    proc = subprocess.run(
        [sys.executable, "-m", "exporter_watchdog.cli", "targets", "-o", str(out), "--server-port", "8001"],
        env=slurm_cluster.env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(out.read_text())
    assert {g["labels"]["node"] for g in groups} == set(slurm_cluster.nodes)
    assert sorted(g["targets"][0] for g in groups) == sorted(
        f"{node}:{port}" for node in slurm_cluster.nodes for port in (8001, 9400)
    )
    _ok(run_tool([tools["promtool"], "check", "config", str(work / "prometheus.yml")]))


def test_promtool_check_rules() -> None:
    tools = require_binaries("promtool")
    assert RULE_FILES, "no rule files"
    _ok(run_tool([tools["promtool"], "check", "rules", *map(str, RULE_FILES)]))


def test_promtool_test_rules() -> None:
    tools = require_binaries("promtool")
    assert TEST_FILES, "no rule tests"
    proc = run_tool([tools["promtool"], "test", "rules", *map(str, TEST_FILES)])
    _ok(proc)
    assert proc.stdout.count("SUCCESS") == len(TEST_FILES)


def test_rule_tests_are_outside_the_rules_glob() -> None:
    config = _yaml(PROMETHEUS_DIR / "prometheus.yml")
    loaded = {p.resolve() for pattern in config["rule_files"] for p in PROMETHEUS_DIR.glob(pattern)}
    assert loaded == {p.resolve() for p in RULE_FILES}
    assert not loaded & {p.resolve() for p in TEST_FILES}


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for case in _yaml(path)["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert len(names) >= 11
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - names == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_severity_summary_description_and_runbook() -> None:
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{rule['alert']} has no {key}"
        anchor = rule["alert"].lower()
        assert f"docs/monitoring.md#{anchor}" in rule["annotations"]["runbook"]
        assert f"### {rule['alert']}" in (REPO / "docs" / "monitoring.md").read_text(), rule["alert"]


def test_amtool_check_config() -> None:
    tools = require_binaries("amtool")
    proc = run_tool([tools["amtool"], "check-config", str(ALERTMANAGER)])
    _ok(proc)
    assert "SUCCESS" in proc.stdout


@pytest.mark.parametrize("severity", sorted(SEVERITIES))
def test_each_severity_routes_to_its_ntfy_receiver(severity: str) -> None:
    tools = require_binaries("amtool")
    proc = run_tool([
        tools["amtool"], "config", "routes", "test", f"--config.file={ALERTMANAGER}",
        f"--verify.receivers=ntfy-{severity}", f"severity={severity}", "alertname=Any", "node=n1",
    ])
    _ok(proc)


def test_receivers_post_to_ntfy_with_template_priority_token_file_and_resolved() -> None:
    config = _yaml(ALERTMANAGER)
    priorities = {}
    for receiver in config["receivers"]:
        (hook,) = receiver["webhook_configs"]
        assert "template=alertmanager" in hook["url"]
        assert hook["send_resolved"] is True
        auth = hook["http_config"]["authorization"]
        assert auth.get("credentials_file") and "credentials" not in auth
        priorities[receiver["name"]] = hook["url"].split("priority=")[1].split("&")[0]
    assert priorities == {"ntfy-critical": "5", "ntfy-warning": "4", "ntfy-info": "2"}
    assert "tk_" not in ALERTMANAGER.read_text()


def test_the_compose_stack_mounts_files_that_exist() -> None:
    compose_path = REPO / "docker" / "monitoring" / "compose.yaml"
    compose = _yaml(compose_path)
    assert {"prometheus", "alertmanager", "grafana", "ntfy"} <= set(compose["services"])
    mounted = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            # Named volumes and the site's own token file (from a variable) are not in the repo.
            if source.startswith("../"):
                assert (compose_path.parent / source).exists(), f"{name} mounts missing {source}"
                mounted.append(source)
    assert {"../../prometheus", "../../grafana/provisioning", "../../grafana/dashboards"} <= set(mounted)


def test_grafana_provisioning_points_at_the_dashboard_folder() -> None:
    provider = _yaml(REPO / "grafana" / "provisioning" / "dashboards" / "exporter-watchdog.yml")
    (entry,) = provider["providers"]
    assert entry["options"]["path"]
    dashboard = json.loads((REPO / "grafana" / "dashboards" / "exporter-watchdog.json").read_text())
    assert dashboard["uid"] and dashboard["panels"]
