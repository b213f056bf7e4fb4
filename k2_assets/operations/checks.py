"""Checks on the file layout of ``market.trades``: file counts and sizes per partition.

They read the table's current snapshot whenever they run (after a compaction in the same run,
or on their own from the UI), so they go yellow when micro-batches have piled up small files.
"""

from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from k2_assets.operations.assets import trades_file_layout
from k2_resources.catalog.resource import IcebergResource
from k2_resources.operations.maintenance import PartitionStats, TableMaintenanceResource, partition_stats

SHOWN_PARTITIONS = 20


def _by_partition(stats: list[PartitionStats]) -> MetadataValue:
    worst = sorted(stats, key=lambda s: (-s.files, s.partition))[:SHOWN_PARTITIONS]
    return MetadataValue.json(
        {
            s.partition: {
                "files": s.files,
                "small_files": s.small_files,
                "records": s.records,
                "bytes": s.total_bytes,
                "mean_file_bytes": round(s.mean_file_bytes),
                "min_file_bytes": s.min_file_bytes,
                "max_file_bytes": s.max_file_bytes,
            }
            for s in worst
        }
    )


@asset_check(
    asset=trades_file_layout,
    name="files_per_partition",
    description="No (day, exchange) partition of market.trades holds more data files than the maintenance limit.",
)
def trades_files_per_partition(iceberg: IcebergResource, maintenance: TableMaintenanceResource) -> AssetCheckResult:
    stats = partition_stats(iceberg.trades(), maintenance.small_file_bytes)
    over = [s.partition for s in stats if s.files > maintenance.max_files_per_partition]
    return AssetCheckResult(
        passed=not over,
        severity=AssetCheckSeverity.WARN,
        description=(
            f"{len(over)} partitions hold more than {maintenance.max_files_per_partition} files: "
            "run the trades_table_maintenance job"
        )
        if over
        else None,
        metadata={
            "partitions": len(stats),
            "partitions_over_limit": len(over),
            "max_files": max((s.files for s in stats), default=0),
            "limit": maintenance.max_files_per_partition,
            "by_partition": _by_partition(stats),
        },
    )


@asset_check(
    asset=trades_file_layout,
    name="small_files_per_partition",
    description="No partition of market.trades has piled up enough small files to be due for compaction.",
)
def trades_small_files_per_partition(
    iceberg: IcebergResource, maintenance: TableMaintenanceResource
) -> AssetCheckResult:
    stats = partition_stats(iceberg.trades(), maintenance.small_file_bytes)
    due = [s.partition for s in stats if s.small_files >= maintenance.min_small_files]
    files = sum(s.files for s in stats)
    total = sum(s.total_bytes for s in stats)
    return AssetCheckResult(
        passed=not due,
        severity=AssetCheckSeverity.WARN,
        description=(
            f"{len(due)} partitions have at least {maintenance.min_small_files} files under "
            f"{maintenance.small_file_bytes} bytes: compaction is due"
        )
        if due
        else None,
        metadata={
            "partitions_due": len(due),
            "small_file_bytes": maintenance.small_file_bytes,
            "mean_file_bytes": round(total / files) if files else 0,
            "smallest_file_bytes": min((s.min_file_bytes for s in stats), default=0),
            "by_partition": _by_partition(stats),
        },
    )


MAINTENANCE_CHECKS = [trades_files_per_partition, trades_small_files_per_partition]
