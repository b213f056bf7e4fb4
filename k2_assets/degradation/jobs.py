"""The hourly refresh of the symbol-tier ranking (on by default: tiers are only as good as they are fresh)."""

from dagster import AssetSelection, DefaultScheduleStatus, ScheduleDefinition, define_asset_job

from k2_assets.degradation.assets import symbol_tiers

symbol_tiers_job = define_asset_job(
    "symbol_tiers_refresh",
    selection=AssetSelection.assets(symbol_tiers),
    description="Rank symbols by 24-hour traded notional into load-shedding tiers.",
)

symbol_tiers_schedule = ScheduleDefinition(
    name="symbol_tiers_hourly",
    job=symbol_tiers_job,
    cron_schedule="7 * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Re-rank symbols by 24-hour notional every hour (hh:07 UTC); on by default, since stale "
    "or missing rankings leave load shedding on the static lists.",
)
