"""Operations: alerting on failed asset checks, through the webhook alert sensor (``alerts``).

``defs`` holds the alert sensor, its webhook resource (key ``alert_webhooks``) and, for now, the
degradation configuration (key ``degradation``, from ``k2_resources.degradation``);
``k2_assets/definitions.py`` merges it.
"""

from __future__ import annotations

from dagster import Definitions

from k2_resources.degradation.resource import RESOURCE_KEY as DEGRADATION_KEY
from k2_resources.degradation.resource import DegradationResource
from k2_sensors.operations.alerts import RESOURCE_KEY as ALERTS_KEY
from k2_sensors.operations.alerts import AlertWebhookResource, build_alert_sensor

defs = Definitions(
    sensors=[build_alert_sensor()],
    resources={ALERTS_KEY: AlertWebhookResource(), DEGRADATION_KEY: DegradationResource()},
)
