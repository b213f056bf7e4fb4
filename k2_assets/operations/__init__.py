"""operations domain: maintenance of Iceberg market.trades (compaction, snapshot expiry,
orphan-file clean-up), its file-layout checks, job and schedule."""

from dagster import Definitions

from k2_assets.operations.assets import (
    MAINTENANCE_ASSETS,
    trades_file_layout,
    trades_snapshot_history,
    trades_storage,
)
from k2_assets.operations.checks import MAINTENANCE_CHECKS
from k2_assets.operations.jobs import trades_table_maintenance_job, trades_table_maintenance_schedule
from k2_resources.operations.maintenance import TableMaintenanceResource

defs = Definitions(
    assets=MAINTENANCE_ASSETS,
    asset_checks=MAINTENANCE_CHECKS,
    jobs=[trades_table_maintenance_job],
    schedules=[trades_table_maintenance_schedule],
    resources={"maintenance": TableMaintenanceResource()},
)

__all__ = ["defs", "trades_file_layout", "trades_snapshot_history", "trades_storage"]
