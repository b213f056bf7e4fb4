"""The Prometheus and Alertmanager configuration in infra/ is valid and the alert rules pass promtool's unit tests."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from k2_resources import metrics
from k2_resources.paths import PROJECT_ROOT

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = PROJECT_ROOT / "infra" / "prometheus"
RULES = PROMETHEUS_DIR / "rules" / "k2-alerts.yml"
RULE_TESTS = PROMETHEUS_DIR / "rules" / "k2-alerts.test.yml"
ALERTMANAGER = PROJECT_ROOT / "infra" / "alertmanager" / "alertmanager.yml"
WEBHOOK_PLACEHOLDER = "${K2_ALERT_WEBHOOK_URL}"


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, (
        f"{name} is missing: run `bash infra/scripts/system-deps.sh --test` "
        "(Debian packages prometheus, prometheus-alertmanager)"
    )
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120)


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = run(tool("promtool"), "test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def rules_without_a_firing_case(rules: list[dict], tests: list[dict]) -> set[tuple[str, str]]:
    """(alert, severity) of every rule no promtool case expects to fire."""
    wanted = {(rule["alert"], rule["labels"]["severity"]) for rule in rules}
    fired = {
        (case["alertname"], alert["exp_labels"]["severity"])
        for test in tests
        for case in test.get("alert_rule_test") or []
        for alert in case.get("exp_alerts") or []
    }
    return wanted - fired


def test_every_rule_has_a_promtool_case_that_fires_it() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    assert rules_without_a_firing_case(rules, tests) == set()
    # and the check can fail: a rule nobody tests is found
    untested = [*rules, {"alert": "K2Untested", "labels": {"severity": "critical"}, "expr": "vector(1)"}]
    assert rules_without_a_firing_case(untested, tests) == {("K2Untested", "critical")}


def test_promtool_fails_a_rule_test_that_expects_the_wrong_thing(tmp_path: Path) -> None:
    """The rule tests can fail: a copy expecting no lag alert at 90s is rejected."""
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(RULES)]
    tests["tests"][0]["alert_rule_test"][1]["exp_alerts"] = []
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(tests))
    result = run(tool("promtool"), "test", "rules", str(broken))
    assert result.returncode != 0
    assert "K2ConsumerLagHigh" in result.stdout + result.stderr


def test_prometheus_config_and_rules_are_valid() -> None:
    result = run(tool("promtool"), "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 rules found" in result.stdout
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]}
    assert targets == {"k2": ["127.0.0.1:9465"], "k2-streamer": ["127.0.0.1:9464"], "k2-api": ["127.0.0.1:8000"]}


def test_the_rules_alert_on_the_metrics_k2_exports() -> None:
    exported = {m.name for m in metrics.REGISTRY.collect()}
    exported |= {m.name for m in metrics.StreamerMetrics(CollectorRegistry()).registry.collect()}  # :9464
    exported |= {f"{name}_total" for name in exported}
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {r["alert"] for r in rules} == {
        "K2ConsumerLagHigh",
        "K2DegradationLevel",
        "K2DeadLetters",
        "K2BinanceTradeIdReset",
        "K2BinanceGapsUnfilled",
    }
    for rule in rules:
        for name in re.findall(r"\bk2_[a-z_]+", rule["expr"]):
            assert name in exported, f"rule {rule['alert']} uses {name}, which k2_resources/metrics.py does not define"


def test_alertmanager_config_is_valid_once_the_webhook_url_is_filled_in(tmp_path: Path) -> None:
    template = ALERTMANAGER.read_text()
    assert WEBHOOK_PLACEHOLDER in template
    rendered = tmp_path / "alertmanager.yml"
    rendered.write_text(template.replace(WEBHOOK_PLACEHOLDER, "http://127.0.0.1:9095/alerts"))
    result = run(tool("amtool"), "check-config", str(rendered))
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(rendered.read_text())
    assert config["receivers"][0]["webhook_configs"][0] == {
        "url": "http://127.0.0.1:9095/alerts",
        "send_resolved": True,
    }
    # the unrendered template is refused, so a forgotten placeholder cannot start silently
    assert run(tool("amtool"), "check-config", str(ALERTMANAGER)).returncode != 0
