"""Alerts on failed asset checks: a sensor that posts JSON to webhooks, once per incident.

Every tick the sensor reads the latest completed evaluation of each watched asset check from the
Dagster instance (the stream sensor reports lag and degradation as runless check evaluations;
materialisations report theirs in runs). A failing check (WARN or ERROR) opens an incident and
posts a ``firing`` alert; while it keeps failing the alert is repeated every
``renotify_interval_seconds`` or at once when its severity rises; when it passes again a
``resolved`` alert is posted and the incident closes. Incidents live in the sensor cursor.

The decision is the pure function ``decide_alerts``; the HTTP post uses only ``urllib``.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from dagster import (
    AssetCheckKey,
    ConfigurableResource,
    DagsterInstance,
    DefaultSensorStatus,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

# not exported from the dagster package (dagster is pinned to 1.13 in pyproject.toml)
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from pydantic import Field

from k2_resources.errors import K2Error

logger = logging.getLogger("k2.alerts")

CURSOR_VERSION = 1
WEBHOOKS_ENV = "K2_ALERT_WEBHOOKS"
RESOURCE_KEY = "alert_webhooks"
SEVERITY_RANK = {"WARN": 1, "ERROR": 2}

FIRING = "firing"
RESOLVED = "resolved"


# -- pure decision logic -------------------------------------------------------------------


@dataclass(frozen=True)
class CheckObservation:
    """The latest completed evaluation of one asset check."""

    check: str  # "<asset key>:<check name>", as AssetCheckKey.to_user_string() writes it
    passed: bool
    severity: str  # "WARN" or "ERROR"
    evaluated_at: float
    description: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Alert:
    """A notification to post: ``status`` firing or resolved; ``reason`` new, renotify, escalated or recovered."""

    check: str
    status: str
    reason: str
    severity: str
    since: float
    observation: CheckObservation

    def payload(self, now: float) -> dict[str, Any]:
        """The JSON body posted to each webhook (``text`` makes it readable in chat webhooks too)."""
        verb = "FIRING" if self.status == FIRING else "RESOLVED"
        description = self.observation.description or ""
        text = f"[K2 {verb}] {self.severity} check {self.check}" + (f": {description}" if description else "")
        return {
            "source": "k2",
            "status": self.status,
            "reason": self.reason,
            "check": self.check,
            "severity": self.severity,
            "passed": self.observation.passed,
            "description": self.observation.description,
            "metadata": dict(self.observation.metadata),
            "incident_since": _iso(self.since),
            "evaluated_at": _iso(self.observation.evaluated_at),
            "sent_at": _iso(now),
            "text": text,
        }


def decide_alerts(
    incidents: Mapping[str, Mapping[str, Any]],
    observations: Iterable[CheckObservation],
    now: float,
    renotify_interval_seconds: float,
) -> tuple[dict[str, dict[str, Any]], list[Alert]]:
    """New incident state and the alerts to post, from the previous state and the latest evaluations.

    An incident is ``{"severity", "since", "notified_at"}`` keyed by check. Checks with no
    observation keep their state untouched (no evaluation yet, or a run still in progress).
    """
    state: dict[str, dict[str, Any]] = {check: dict(incident) for check, incident in incidents.items()}
    alerts: list[Alert] = []
    for obs in observations:
        incident = state.get(obs.check)
        if obs.passed:
            if incident is not None:
                alerts.append(Alert(obs.check, RESOLVED, "recovered", incident["severity"], incident["since"], obs))
                del state[obs.check]
            continue
        if incident is None:
            state[obs.check] = {"severity": obs.severity, "since": now, "notified_at": now}
            alerts.append(Alert(obs.check, FIRING, "new", obs.severity, now, obs))
        elif SEVERITY_RANK.get(obs.severity, 0) > SEVERITY_RANK.get(incident["severity"], 0):
            incident.update(severity=obs.severity, notified_at=now)
            alerts.append(Alert(obs.check, FIRING, "escalated", obs.severity, incident["since"], obs))
        elif now - float(incident["notified_at"]) >= renotify_interval_seconds:
            incident.update(severity=obs.severity, notified_at=now)
            alerts.append(Alert(obs.check, FIRING, "renotify", obs.severity, incident["since"], obs))
    return state, alerts


def settle_incidents(
    previous: Mapping[str, Mapping[str, Any]],
    proposed: Mapping[str, Mapping[str, Any]],
    undelivered: Iterable[str],
) -> dict[str, dict[str, Any]]:
    """The state to keep: ``proposed``, except that checks whose alert was not delivered revert,
    so the same alert is tried again next tick."""
    final = {check: dict(incident) for check, incident in proposed.items()}
    for check in undelivered:
        if check in previous:
            final[check] = dict(previous[check])
        else:
            final.pop(check, None)
    return final


def parse_cursor(cursor: str | None) -> dict[str, dict[str, Any]]:
    """Incidents from the sensor cursor ``{"version": 1, "incidents": {...}}``; empty for none."""
    if not cursor:
        return {}
    try:
        data = json.loads(cursor)
        if data.get("version") != CURSOR_VERSION:
            raise ValueError(f"unknown cursor version {data.get('version')!r}")
        return {str(check): dict(incident) for check, incident in data["incidents"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise K2Error(
            f"the alert sensor's cursor is unreadable ({exc}); reset the sensor's cursor in the Dagster UI"
        ) from exc


def format_cursor(incidents: Mapping[str, Mapping[str, Any]]) -> str:
    return json.dumps({"version": CURSOR_VERSION, "incidents": incidents}, sort_keys=True)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat()


# -- webhook resource ----------------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    url: str
    ok: bool
    detail: str


class AlertWebhookResource(ConfigurableResource):
    """Where alerts go: webhook URLs that accept a JSON POST (default: none, from ``K2_ALERT_WEBHOOKS``)."""

    urls: list[str] | None = Field(
        default=None,
        description=(
            f"Webhook URLs; default: ${WEBHOOKS_ENV} (comma separated), else no webhooks (alerts are only logged)."
        ),
    )
    renotify_interval_seconds: float = Field(
        default=3600.0, description="Repeat a still-failing check's alert after this many seconds."
    )
    timeout_seconds: float = Field(default=5.0, description="HTTP timeout per webhook post.")

    def webhook_urls(self) -> list[str]:
        """Configured URLs, else those in ``$K2_ALERT_WEBHOOKS``; each must be http(s)."""
        raw = self.urls if self.urls is not None else os.environ.get(WEBHOOKS_ENV, "").split(",")
        urls = [url.strip() for url in raw if url and url.strip()]
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise K2Error(
                    f"alert webhook {url!r} is not an http(s) URL; fix {WEBHOOKS_ENV} or the alert_webhooks "
                    "resource's urls (e.g. https://hooks.example.com/k2)"
                )
        return urls

    def post(self, payload: Mapping[str, Any]) -> list[Delivery]:
        """POST ``payload`` as JSON to every URL; one Delivery per URL (never raises on HTTP errors)."""
        body = json.dumps(payload).encode("utf-8")
        deliveries = []
        for url in self.webhook_urls():
            request = urllib.request.Request(
                url, data=body, method="POST", headers={"Content-Type": "application/json", "User-Agent": "k2-alerts"}
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    deliveries.append(Delivery(url, 200 <= response.status < 300, f"HTTP {response.status}"))
            except urllib.error.HTTPError as exc:
                deliveries.append(Delivery(url, False, f"HTTP {exc.code}"))
            except (urllib.error.URLError, OSError, TimeoutError) as exc:
                deliveries.append(Delivery(url, False, f"{type(exc).__name__}: {exc}"))
        return deliveries


# -- reading check evaluations from the instance -------------------------------------------


def _plain(value: Any) -> Any:
    raw = getattr(value, "value", value)
    if isinstance(raw, (str, int, float, bool)) or raw is None:
        return raw
    return str(raw)


def latest_check_observations(instance: DagsterInstance, check_keys: Sequence[AssetCheckKey]) -> list[CheckObservation]:
    """The latest completed (passed or failed) evaluation of each check; checks never evaluated are absent."""
    storage = instance.event_log_storage
    completed = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}
    latest = storage.get_latest_asset_check_execution_by_key(list(check_keys))
    observations = []
    for key in check_keys:
        record = latest.get(key)
        if record is not None and record.status not in completed:
            # a run is evaluating it right now: judge by the previous completed evaluation
            history = storage.get_asset_check_execution_history(key, limit=1, status=completed)
            record = history[0] if history else None
        evaluation = record.evaluation if record is not None else None
        if record is None or evaluation is None or record.event is None:
            continue
        observations.append(
            CheckObservation(
                check=key.to_user_string(),
                passed=bool(evaluation.passed),
                severity=evaluation.severity.value,
                evaluated_at=float(record.event.timestamp),
                description=evaluation.description,
                metadata={name: _plain(value) for name, value in evaluation.metadata.items()},
            )
        )
    return observations


# -- the sensor ----------------------------------------------------------------------------


def build_alert_sensor(
    name: str = "k2_check_alerts",
    check_keys: Sequence[AssetCheckKey] | None = None,
    minimum_interval_seconds: int = 30,
    default_status: DefaultSensorStatus = DefaultSensorStatus.RUNNING,
    clock: Any = time.time,
) -> SensorDefinition:
    """A sensor posting webhook alerts for failing asset checks.

    ``check_keys``: the checks to watch; None watches every asset check of the code location.
    The cursor is ``{"version": 1, "incidents": {"<asset>:<check>": {"severity", "since", "notified_at"}}}``.
    """

    @sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Posts a JSON alert to the alert_webhooks URLs when an asset check fails (WARN or ERROR), "
        "repeats it every re-notify interval while it fails, and posts the recovery.",
    )
    def _alert_sensor(context: SensorEvaluationContext, alert_webhooks: AlertWebhookResource) -> SensorResult:
        keys = list(check_keys) if check_keys is not None else _all_check_keys(context)
        previous = parse_cursor(context.cursor)
        observations = latest_check_observations(context.instance, keys)
        now = clock()
        proposed, alerts = decide_alerts(previous, observations, now, alert_webhooks.renotify_interval_seconds)
        undelivered = []
        for alert in alerts:
            payload = alert.payload(now)
            if alert.status == FIRING:
                context.log.warning(payload["text"])
            else:
                context.log.info(payload["text"])
            deliveries = alert_webhooks.post(payload)
            for delivery in deliveries:
                if not delivery.ok:
                    context.log.error(f"alert for {alert.check} not delivered to {delivery.url}: {delivery.detail}")
            if deliveries and not any(d.ok for d in deliveries):
                undelivered.append(alert.check)
        final = settle_incidents(previous, proposed, undelivered)
        summary = (
            f"{len(alerts) - len(undelivered)} alert(s) sent, {len(undelivered)} to retry; "
            f"{len(final)} open incident(s) over {len(keys)} check(s)"
        )
        return SensorResult(skip_reason=summary, cursor=format_cursor(final))

    return _alert_sensor


def _all_check_keys(context: SensorEvaluationContext) -> list[AssetCheckKey]:
    repository = context.repository_def
    if repository is None:
        raise K2Error(
            "the alert sensor was built without check_keys and has no code location to read them from; "
            "pass check_keys=[...] to build_alert_sensor"
        )
    return sorted(repository.asset_graph.asset_check_keys, key=lambda k: k.to_user_string())
