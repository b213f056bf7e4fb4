"""operations domain: maintenance of Iceberg market.trades (compaction, snapshot expiry,
orphan-file clean-up), its file-layout checks, job and schedule; scheduled replays into Kafka;
retention of the stream's Dagster history (job and nightly schedule); the sensor that sends
alerts on failing checks to webhooks."""

from dagster import Definitions

from k2_assets.operations.assets import (
    MAINTENANCE_ASSETS,
    trades_file_layout,
    trades_snapshot_history,
    trades_storage,
)
from k2_assets.operations.checks import MAINTENANCE_CHECKS
from k2_assets.operations.health_checks import TABLE_ASSETS, TABLE_HEALTH_CHECKS
from k2_assets.operations.history_retention import dagster_history_retention, dagster_history_retention_nightly
from k2_assets.operations.jobs import trades_table_maintenance_job, trades_table_maintenance_schedule
from k2_assets.operations.replays import trades_replay, trades_replay_nightly
from k2_sensors.operations.alerts import build_alert_sensor

defs = Definitions(
    assets=[*MAINTENANCE_ASSETS, *TABLE_ASSETS],
    asset_checks=[*MAINTENANCE_CHECKS, *TABLE_HEALTH_CHECKS],
    jobs=[trades_table_maintenance_job, trades_replay, dagster_history_retention],
    schedules=[trades_table_maintenance_schedule, trades_replay_nightly, dagster_history_retention_nightly],
    sensors=[build_alert_sensor()],
)

__all__ = ["defs", "trades_file_layout", "trades_snapshot_history", "trades_storage"]
