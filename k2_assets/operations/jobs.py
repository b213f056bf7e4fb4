"""The maintenance job and its nightly schedule (off until an operator turns it on)."""

from dagster import AssetSelection, DefaultScheduleStatus, ScheduleDefinition, define_asset_job

from k2_assets.operations.assets import MAINTENANCE_ASSETS

MAINTENANCE_TAGS = {"k2/kind": "maintenance"}  # dagster.yaml lets one such run go at a time

trades_table_maintenance_job = define_asset_job(
    "trades_table_maintenance",
    selection=AssetSelection.assets(*MAINTENANCE_ASSETS),
    description="Compact market.trades, expire old snapshots, delete orphan files; then check file counts and sizes.",
    tags=MAINTENANCE_TAGS,
)

trades_table_maintenance_schedule = ScheduleDefinition(
    name="trades_table_maintenance_nightly",
    job=trades_table_maintenance_job,
    cron_schedule="17 3 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Nightly table maintenance of market.trades (03:17 UTC); off by default, turn on in the UI.",
)
