"""Operations: degradation levels, load shedding, the spill store and alerting on failed checks.

``defs`` holds the alert sensor and its webhook resource; ``k2_assets/definitions.py`` merges it.
"""

from __future__ import annotations

from dagster import Definitions

from k2_sensors.operations.alerts import RESOURCE_KEY, AlertWebhookResource, build_alert_sensor

defs = Definitions(
    sensors=[build_alert_sensor()],
    resources={RESOURCE_KEY: AlertWebhookResource()},
)
