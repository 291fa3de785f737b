"""The Prometheus alert rules: valid, unit-tested by promtool, on metrics the code exports."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml  # PyYAML (in the dev lock) ships no stubs
from prometheus_client import REGISTRY

import orderflow.bus.metrics
import orderflow.email.metrics
import orderflow.orders.metrics
from tests.support.apt import apt_install

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
ALERTS = DEPLOY / "alerts.yml"
PROMTOOL = Path("/usr/bin/promtool")

#: The modules whose metrics the rules may use (imported so that they are registered).
METRIC_MODULES = (orderflow.bus.metrics, orderflow.email.metrics, orderflow.orders.metrics)

#: The suffixes under which prometheus_client exposes a family's samples.
SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}


@pytest.fixture(scope="module")
def promtool() -> Path:
    """Debian's promtool, installed (prometheus, without its recommends) when missing."""
    return apt_install("prometheus", PROMTOOL, recommends=False)


def run(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """promtool ``args`` run in deploy/prometheus (the rule files name each other relatively)."""
    return subprocess.run(
        [str(promtool), *args], cwd=DEPLOY, capture_output=True, text=True, timeout=60, check=False
    )


def test_rules_are_valid(promtool: Path) -> None:
    done = run(promtool, "check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout


def test_rules_fire_when_they_should_and_only_then(promtool: Path) -> None:
    done = run(promtool, "test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_example_configuration_loads_the_rules(promtool: Path) -> None:
    done = run(promtool, "check", "config", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def rules() -> list[dict[str, object]]:
    """Every rule of alerts.yml."""
    loaded = yaml.safe_load(ALERTS.read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def exported_names() -> set[str]:
    """Every sample name the code's metrics can expose."""
    assert METRIC_MODULES  # imported for their registration
    names = set()
    for family in REGISTRY.collect():
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def test_every_rule_is_unit_tested() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    tested = {check["alertname"] for test in tests for check in test["alert_rule_test"]}
    fired = {
        check["alertname"]
        for test in tests
        for check in test["alert_rule_test"]
        if check.get("exp_alerts")
    }
    names = {str(rule["alert"]) for rule in rules()}
    assert names == tested == fired


def test_every_metric_a_rule_uses_is_exported_by_the_code() -> None:
    used = {name for rule in rules() for name in re.findall(r"\borderflow_\w+", str(rule["expr"]))}
    assert used, "no orderflow metric found in the rules"
    missing = used - exported_names()
    assert not missing, f"alerts.yml uses metrics the code does not export: {sorted(missing)}"
