"""One source of thresholds: the checks, the degradation manager and the Prometheus alert rules agree.

The rules file cannot import Python, so this parses it and compares every threshold in it with
``k2_resources/thresholds.py`` and with what the resources use by default.
"""

from __future__ import annotations

import re

import yaml
from dagster import AssetCheckSeverity

from k2_resources import thresholds
from k2_resources.degradation.levels import DegradationLevel, DegradationThresholds, check_status
from k2_resources.degradation.resource import DegradationResource
from k2_resources.paths import PROJECT_ROOT
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_checks import lag_evaluation
from k2_sensors.binance.stream_observation import StreamOffsets

RULES = PROJECT_ROOT / "infra" / "prometheus" / "rules" / "k2-alerts.yml"


def _rules() -> dict[tuple[str, str], dict]:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    return {(rule["alert"], rule["labels"]["severity"]): rule for rule in rules}


def _threshold(expr: str, metric: str) -> tuple[str, int]:
    """(comparison, number) of ``... metric ...) >= N``-style expressions."""
    assert metric in expr, expr
    match = re.search(r"(>=|>|==)\s*([0-9_]+)\s*$", expr)
    assert match, f"no trailing threshold in {expr!r}"
    return match.group(1), int(match.group(2))


def test_lag_alerts_fire_where_the_lag_check_turns_warn_and_error():
    rules = _rules()
    warning = _threshold(rules[("K2ConsumerLagHigh", "warning")]["expr"], "k2_consumer_lag_messages")
    critical = _threshold(rules[("K2ConsumerLagHigh", "critical")]["expr"], "k2_consumer_lag_messages")
    assert warning == (">=", thresholds.LAG_WARN_MESSAGES)
    assert critical == (">=", thresholds.LAG_ERROR_MESSAGES)
    sink = TradeSinkResource()
    assert (sink.lag_warn_messages, sink.lag_error_messages) == (warning[1], critical[1])


def test_the_lag_check_and_the_degradation_ladder_share_their_numbers():
    assert tuple(DegradationResource().lag_triggers) == thresholds.LAG_TRIGGERS == DegradationThresholds().lag_messages
    assert tuple(DegradationResource().memory_triggers_percent) == thresholds.MEMORY_TRIGGERS_PERCENT
    assert DegradationThresholds().lag_trigger(DegradationLevel.SOFT) == thresholds.LAG_WARN_MESSAGES
    assert DegradationThresholds().lag_trigger(DegradationLevel.AGGRESSIVE) == thresholds.LAG_ERROR_MESSAGES
    assert thresholds.LAG_TRIGGERS == (100_000, 500_000, 1_000_000, 5_000_000)  # the design brief's


def test_the_lag_check_turns_at_exactly_the_alert_thresholds():
    sink = TradeSinkResource()

    def verdict(lag: int) -> tuple[bool, AssetCheckSeverity]:
        outcome = lag_evaluation(StreamOffsets("t", {0: lag}, {0: 0}), sink)
        return outcome.passed, outcome.severity

    assert verdict(thresholds.LAG_WARN_MESSAGES - 1)[0] is True
    assert verdict(thresholds.LAG_WARN_MESSAGES) == (False, AssetCheckSeverity.WARN)
    assert verdict(thresholds.LAG_ERROR_MESSAGES - 1) == (False, AssetCheckSeverity.WARN)
    assert verdict(thresholds.LAG_ERROR_MESSAGES) == (False, AssetCheckSeverity.ERROR)


def test_degradation_alerts_fire_where_the_level_check_turns_warn_and_error():
    rules = _rules()
    warning = _threshold(rules[("K2DegradationLevel", "warning")]["expr"], "k2_degradation_level")
    critical = _threshold(rules[("K2DegradationLevel", "critical")]["expr"], "k2_degradation_level")
    assert warning == (">=", thresholds.DEGRADATION_WARN_LEVEL)
    assert critical == (">=", thresholds.DEGRADATION_ERROR_LEVEL)
    for level in DegradationLevel:
        passed, severity = check_status(level)
        assert passed == (level < warning[1]), level
        assert (severity == "ERROR") == (level >= critical[1]), level


def test_every_alert_says_where_the_details_are():
    for (alert, severity), rule in _rules().items():
        annotations = rule["annotations"]
        assert {"summary", "description", "dagster_check", "where", "runbook"} <= set(annotations), alert
        section = annotations["runbook"].split("#", 1)[1]
        headings = re.findall(r"^#+ (.+)$", (PROJECT_ROOT / "docs" / "operations.md").read_text(), re.MULTILINE)
        anchors = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
        assert section in anchors, f"{alert}/{severity}: docs/operations.md has no section #{section}"


def test_the_dead_letter_alert_points_at_the_topic_it_counts():
    annotations = _rules()[("K2DeadLetters", "warning")]["annotations"]
    text = " ".join(annotations.values())
    assert "{{ $labels.topic }}.dlq" in text  # the exporter counts the end offsets of <topic>.dlq
    assert "market.dead_letters" not in text  # that table holds ASX rows, which this metric does not count
