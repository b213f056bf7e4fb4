"""The alert sensor against a real Dagster instance and a real HTTP webhook on 127.0.0.1.

A check fails in a materialisation run (WARN) and as a runless evaluation (ERROR, the way the
stream sensor reports), then passes; the webhook must receive one alert per incident, a
re-notification after the interval, and the recoveries.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import dagster as dg
import pytest

from k2_assets.definitions import defs
from k2_sensors.operations.alerts import RESOURCE_KEY, AlertWebhookResource, build_alert_sensor, parse_cursor
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration

OUTCOME = {"passed": False}


@dg.asset(
    check_specs=[dg.AssetCheckSpec("row_count", asset="demo_trades")],
    group_name="alert_test",
)
def demo_trades() -> dg.MaterializeResult:
    """A stand-in table whose row_count check passes or fails as the test says."""
    return dg.MaterializeResult(
        check_results=[
            dg.AssetCheckResult(
                check_name="row_count",
                passed=OUTCOME["passed"],
                severity=dg.AssetCheckSeverity.WARN,
                description="row count ok" if OUTCOME["passed"] else "no rows",
                metadata={"rows": 10 if OUTCOME["passed"] else 0},
            )
        ]
    )


@dg.asset_check(asset=demo_trades, name="degradation_level")
def demo_degradation_level() -> dg.AssetCheckResult:
    """Reported by a sensor as runless evaluations in production; never executed in this test."""
    return dg.AssetCheckResult(passed=True)


LEVEL = dg.AssetCheckKey(dg.AssetKey("demo_trades"), "degradation_level")


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_alert_then_renotify_then_recovery_reach_a_real_webhook(k2_home, webhook: WebhookReceiver) -> None:
    clock = Clock()
    alert_sensor = build_alert_sensor(clock=clock)  # watches every check of the code location
    resource = AlertWebhookResource(urls=[webhook.url], renotify_interval_seconds=600)
    defs = dg.Definitions(
        assets=[demo_trades],
        asset_checks=[demo_degradation_level],
        sensors=[alert_sensor],
        resources={RESOURCE_KEY: resource},
    )
    with dg.DagsterInstance.ephemeral() as instance:
        cursor: str | None = None

        def tick() -> str:
            nonlocal cursor
            context = dg.build_sensor_context(
                instance=instance, cursor=cursor, definitions=defs, resources={RESOURCE_KEY: resource}
            )
            result = alert_sensor(context)
            cursor = result.cursor
            return result.skip_reason.skip_message if result.skip_reason else ""

        # nothing evaluated yet: no alerts, two checks watched
        assert tick().endswith("0 open incident(s) over 2 check(s)") and webhook.received == []

        # a run whose row_count check fails (WARN)
        OUTCOME["passed"] = False
        assert dg.materialize([demo_trades], instance=instance).success
        tick()
        first = webhook.wait_for(1)[0]
        assert (first["status"], first["reason"], first["check"], first["severity"]) == (
            "firing",
            "new",
            "demo_trades:row_count",
            "WARN",
        )
        assert first["metadata"] == {"rows": 0} and first["description"] == "no rows"

        # the same incident is not posted again on the next ticks
        clock.now += 60
        tick()
        tick()
        assert len(webhook.received) == 1
        assert set(parse_cursor(cursor)) == {"demo_trades:row_count"}

        # the stream sensor's way: a runless ERROR evaluation of another check
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("demo_trades"),
                check_name="degradation_level",
                passed=False,
                severity=dg.AssetCheckSeverity.ERROR,
                description="CIRCUIT_BREAK: lag 5,200,000 >= 5,000,000",
                metadata={"level": 4},
            )
        )
        tick()
        second = webhook.wait_for(2)[1]
        assert (second["status"], second["check"], second["severity"], second["metadata"]) == (
            "firing",
            "demo_trades:degradation_level",
            "ERROR",
            {"level": 4},
        )

        # past the re-notify interval both still-failing checks are posted again, once
        clock.now += 600
        tick()
        renotified = webhook.wait_for(4)[2:]
        assert sorted((a["check"], a["reason"]) for a in renotified) == [
            ("demo_trades:degradation_level", "renotify"),
            ("demo_trades:row_count", "renotify"),
        ]
        tick()
        assert len(webhook.received) == 4

        # both recover: a passing run and a passing runless evaluation
        OUTCOME["passed"] = True
        assert dg.materialize([demo_trades], instance=instance).success
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("demo_trades"),
                check_name="degradation_level",
                passed=True,
                severity=dg.AssetCheckSeverity.ERROR,
                description="NORMAL",
            )
        )
        clock.now += 30
        tick()
        resolved = webhook.wait_for(6)[4:]
        assert sorted((a["check"], a["status"], a["severity"]) for a in resolved) == [
            ("demo_trades:degradation_level", "resolved", "ERROR"),
            ("demo_trades:row_count", "resolved", "WARN"),
        ]
        assert parse_cursor(cursor) == {}
        tick()
        assert len(webhook.received) == 6


def test_unreachable_webhook_keeps_the_incident_for_retry(k2_home, webhook: WebhookReceiver) -> None:
    from k2_resources.platform.kafka_broker import free_port

    alert_sensor = build_alert_sensor(check_keys=[LEVEL])
    dead = AlertWebhookResource(urls=[f"http://127.0.0.1:{free_port()}/down"], timeout_seconds=2)
    with dg.DagsterInstance.ephemeral() as instance:
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("demo_trades"),
                check_name="degradation_level",
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
            )
        )
        context = dg.build_sensor_context(instance=instance, resources={RESOURCE_KEY: dead})
        result = alert_sensor(context)
        assert "1 to retry" in result.skip_reason.skip_message
        assert parse_cursor(result.cursor) == {}
        # the webhook is back: the alert goes out on the next tick
        alive = AlertWebhookResource(urls=[webhook.url])
        result = alert_sensor(
            dg.build_sensor_context(instance=instance, cursor=result.cursor, resources={RESOURCE_KEY: alive})
        )
        assert [a["check"] for a in webhook.wait_for(1)] == ["demo_trades:degradation_level"]
        assert set(parse_cursor(result.cursor)) == {"demo_trades:degradation_level"}


def test_the_definitions_hold_the_alert_sensor_and_its_resource() -> None:
    repository = defs.get_repository_def()
    assert repository.get_sensor_def("k2_check_alerts").default_status == dg.DefaultSensorStatus.RUNNING
    assert {RESOURCE_KEY, "degradation"} <= set(repository.get_top_level_resources())
