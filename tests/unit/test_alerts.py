"""Alert decisions: once per incident, re-notify interval, escalation, recovery, cursor, webhook config."""

from __future__ import annotations

import pytest

from k2_resources.errors import K2Error
from k2_sensors.operations.alerts import (
    FIRING,
    RESOLVED,
    AlertWebhookResource,
    CheckObservation,
    decide_alerts,
    format_cursor,
    parse_cursor,
    settle_incidents,
)

CHECK = "binance_trades:degradation_level"
HOUR = 3600.0


def failing(severity: str = "WARN", check: str = CHECK) -> CheckObservation:
    return CheckObservation(check, passed=False, severity=severity, evaluated_at=1.0, description="level GRACEFUL")


def passing(check: str = CHECK) -> CheckObservation:
    return CheckObservation(check, passed=True, severity="WARN", evaluated_at=2.0)


def test_a_failing_check_fires_once_then_stays_quiet_until_the_renotify_interval() -> None:
    state, alerts = decide_alerts({}, [failing()], now=100.0, renotify_interval_seconds=HOUR)
    assert [(a.status, a.reason, a.severity) for a in alerts] == [(FIRING, "new", "WARN")]
    assert state == {CHECK: {"severity": "WARN", "since": 100.0, "notified_at": 100.0}}
    for now in (130.0, 1000.0, 100.0 + HOUR - 1):
        state, alerts = decide_alerts(state, [failing()], now=now, renotify_interval_seconds=HOUR)
        assert alerts == []
    state, alerts = decide_alerts(state, [failing()], now=100.0 + HOUR, renotify_interval_seconds=HOUR)
    assert [(a.status, a.reason) for a in alerts] == [(FIRING, "renotify")]
    assert alerts[0].since == 100.0  # the incident keeps its start
    assert state[CHECK]["notified_at"] == 100.0 + HOUR


def test_recovery_posts_resolved_once_and_closes_the_incident() -> None:
    state, _ = decide_alerts({}, [failing("ERROR")], now=10.0, renotify_interval_seconds=HOUR)
    state, alerts = decide_alerts(state, [passing()], now=50.0, renotify_interval_seconds=HOUR)
    assert [(a.status, a.reason, a.severity, a.since) for a in alerts] == [(RESOLVED, "recovered", "ERROR", 10.0)]
    assert state == {}
    state, alerts = decide_alerts(state, [passing()], now=60.0, renotify_interval_seconds=HOUR)
    assert (state, alerts) == ({}, [])


def test_a_new_failure_after_recovery_is_a_new_incident() -> None:
    state, _ = decide_alerts({}, [failing()], now=10.0, renotify_interval_seconds=HOUR)
    state, _ = decide_alerts(state, [passing()], now=20.0, renotify_interval_seconds=HOUR)
    state, alerts = decide_alerts(state, [failing()], now=30.0, renotify_interval_seconds=HOUR)
    assert [(a.reason, a.since) for a in alerts] == [("new", 30.0)]


def test_warn_to_error_notifies_at_once_but_error_to_warn_does_not() -> None:
    state, _ = decide_alerts({}, [failing("WARN")], now=10.0, renotify_interval_seconds=HOUR)
    state, alerts = decide_alerts(state, [failing("ERROR")], now=20.0, renotify_interval_seconds=HOUR)
    assert [(a.reason, a.severity) for a in alerts] == [("escalated", "ERROR")]
    state, alerts = decide_alerts(state, [failing("WARN")], now=30.0, renotify_interval_seconds=HOUR)
    assert alerts == []
    assert state[CHECK]["severity"] == "ERROR"


def test_passing_checks_without_incident_and_unobserved_checks_change_nothing() -> None:
    other = "binance_trades:consumer_lag"
    previous = {other: {"severity": "WARN", "since": 1.0, "notified_at": 1.0}}
    state, alerts = decide_alerts(previous, [passing()], now=10.0, renotify_interval_seconds=HOUR)
    assert alerts == [] and state == previous


def test_several_checks_are_independent() -> None:
    a, b = "x:lag", "x:level"
    state, alerts = decide_alerts({}, [failing(check=a), failing("ERROR", check=b)], 1.0, HOUR)
    assert sorted(x.check for x in alerts) == [a, b]
    state, alerts = decide_alerts(state, [passing(a), failing("ERROR", check=b)], 2.0, HOUR)
    assert [(x.check, x.status) for x in alerts] == [(a, RESOLVED)]
    assert list(state) == [b]


def test_undelivered_alerts_are_retried_next_tick() -> None:
    previous: dict = {}
    proposed, alerts = decide_alerts(previous, [failing()], now=10.0, renotify_interval_seconds=HOUR)
    final = settle_incidents(previous, proposed, undelivered=[alerts[0].check])
    assert final == {}
    _, alerts = decide_alerts(final, [failing()], now=20.0, renotify_interval_seconds=HOUR)
    assert [a.reason for a in alerts] == ["new"]
    # an undelivered recovery keeps the incident open so the recovery is posted again
    open_incident = {CHECK: {"severity": "WARN", "since": 1.0, "notified_at": 1.0}}
    proposed, alerts = decide_alerts(open_incident, [passing()], now=30.0, renotify_interval_seconds=HOUR)
    assert settle_incidents(open_incident, proposed, [CHECK]) == open_incident
    assert settle_incidents(open_incident, proposed, []) == {}


def test_payload_is_json_ready_and_readable() -> None:
    _, alerts = decide_alerts({}, [failing("ERROR")], now=1_700_000_000.0, renotify_interval_seconds=HOUR)
    payload = alerts[0].payload(now=1_700_000_001.0)
    assert payload["status"] == "firing" and payload["check"] == CHECK and payload["severity"] == "ERROR"
    assert payload["incident_since"] == "2023-11-14T22:13:20+00:00"
    assert payload["text"] == f"[K2 FIRING] ERROR check {CHECK}: level GRACEFUL"


def test_cursor_round_trip_and_bad_cursor() -> None:
    incidents = {CHECK: {"severity": "WARN", "since": 1.0, "notified_at": 2.0}}
    assert parse_cursor(format_cursor(incidents)) == incidents
    assert parse_cursor(None) == {} and parse_cursor("") == {}
    with pytest.raises(K2Error, match="reset the sensor's cursor"):
        parse_cursor("not json")
    with pytest.raises(K2Error, match="reset the sensor's cursor"):
        parse_cursor('{"version": 7, "incidents": {}}')


def test_webhook_urls_from_config_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K2_ALERT_WEBHOOKS", raising=False)
    assert AlertWebhookResource().webhook_urls() == []
    assert AlertWebhookResource().renotify_interval_seconds == 3600.0
    monkeypatch.setenv("K2_ALERT_WEBHOOKS", " http://127.0.0.1:9/a , https://hooks.example.com/k2,,")
    assert AlertWebhookResource().webhook_urls() == ["http://127.0.0.1:9/a", "https://hooks.example.com/k2"]
    assert AlertWebhookResource(urls=["http://127.0.0.1:1/x"]).webhook_urls() == ["http://127.0.0.1:1/x"]
    assert AlertWebhookResource(urls=[]).webhook_urls() == []
    with pytest.raises(K2Error, match="not an http"):
        AlertWebhookResource(urls=["ftp://example.com"]).webhook_urls()


def test_post_reports_unreachable_webhooks_without_raising() -> None:
    from k2_resources.platform.kafka_broker import free_port

    url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    deliveries = AlertWebhookResource(urls=[url], timeout_seconds=2).post({"status": "firing"})
    assert len(deliveries) == 1 and deliveries[0].url == url and deliveries[0].ok is False
    assert "Error" in deliveries[0].detail
