"""Operations: degradation levels, load shedding, the spill store and alerting on failed checks.

``defs`` holds the alert sensor, its webhook resource (key ``alert_webhooks``) and the
degradation configuration (key ``degradation``); ``k2_assets/definitions.py`` merges it.
"""

from __future__ import annotations

from dagster import Definitions

from k2_sensors.operations.alerts import RESOURCE_KEY as ALERTS_KEY
from k2_sensors.operations.alerts import AlertWebhookResource, build_alert_sensor
from k2_sensors.operations.config import RESOURCE_KEY as DEGRADATION_KEY
from k2_sensors.operations.config import DegradationResource

defs = Definitions(
    sensors=[build_alert_sensor()],
    resources={ALERTS_KEY: AlertWebhookResource(), DEGRADATION_KEY: DegradationResource()},
)
