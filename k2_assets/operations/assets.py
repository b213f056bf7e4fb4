"""Maintenance of Iceberg ``market.trades``: its file layout, its snapshot history, its storage.

Each asset is the state of one aspect of the table after a maintenance step, so the UI shows
when the table was last compacted, expired and cleaned, and what each step did. They act on
the whole table (no partitions: the steps themselves walk the table's day/exchange partitions)
and run in order: compaction, then expiry, then orphan clean-up (which deletes the files the
first two made unreferenced).
"""

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset
from dagster._core.definitions.metadata import RawMetadataValue

from k2_resources.catalog.resource import IcebergResource
from k2_resources.operations.maintenance import TableMaintenanceResource, partition_stats

GROUP = "operations"
# market.trades is written by these assets; maintenance acts on what they produce.
TRADES_WRITERS = [AssetKey("asx_trades"), AssetKey("binance_trades")]


def _layout_metadata(iceberg: IcebergResource, maintenance: TableMaintenanceResource) -> dict[str, RawMetadataValue]:
    stats = partition_stats(iceberg.trades(), maintenance.small_file_bytes)
    files = sum(s.files for s in stats)
    total = sum(s.total_bytes for s in stats)
    records = sum(s.records for s in stats)
    return {
        "partitions": len(stats),
        "data_files": files,
        "data_bytes": MetadataValue.int(total),
        "records": records,
        "bytes_per_record": round(total / records, 2) if records else 0.0,
        "max_files_in_a_partition": max((s.files for s in stats), default=0),
    }


@asset(
    group_name=GROUP,
    deps=TRADES_WRITERS,
    kinds={"iceberg"},
    metadata={"table": "market.trades"},
)
def trades_file_layout(
    context: AssetExecutionContext, iceberg: IcebergResource, maintenance: TableMaintenanceResource
) -> MaterializeResult:
    """The data files of ``market.trades`` after compaction: per (day, exchange) partition, small
    files rewritten into a few files sorted by symbol then timestamp, in one commit each.

    Compaction changes no rows and no table property, so the committed Kafka offsets, hybrid
    reads and time travel to earlier snapshots read exactly what they read before.
    """
    report = maintenance.compact(iceberg.trades())
    for rewrite in report.rewrites:
        context.log.info(
            f"{rewrite.partition}: {rewrite.files_before} files -> {rewrite.files_after} "
            f"({rewrite.records} records, {rewrite.bytes_before} -> {rewrite.bytes_after} bytes)"
        )
    return MaterializeResult(
        metadata={
            "partitions_compacted": len({r.partition for r in report.rewrites}),
            "files_removed": report.files_removed,
            "files_added": report.files_added,
            "records_rewritten": report.records_rewritten,
            "commits": report.commits,
            "conflicts_retried": report.conflicts,
            "seconds": round(report.seconds, 2),
            **_layout_metadata(iceberg, maintenance),
        }
    )


@asset(group_name=GROUP, deps=[trades_file_layout], kinds={"iceberg"}, metadata={"table": "market.trades"})
def trades_snapshot_history(
    context: AssetExecutionContext, iceberg: IcebergResource, maintenance: TableMaintenanceResource
) -> MaterializeResult:
    """The snapshots ``market.trades`` keeps for time travel: those younger than the retention
    setting, and always the newest ones of the current lineage. Older ones are expired (their
    files are deleted by ``trades_storage``). The committed Kafka offsets live in a table
    property, so they survive the expiry of the snapshots that first recorded them.
    """
    report = maintenance.expire(iceberg.trades())
    context.log.info(f"expired {len(report.expired_ids)} of {report.snapshots_before} snapshots")
    table = iceberg.trades()
    oldest = min((s.timestamp_ms for s in table.snapshots()), default=None)
    return MaterializeResult(
        metadata={
            "snapshots_before": report.snapshots_before,
            "snapshots_expired": len(report.expired_ids),
            "snapshots_kept": report.snapshots_after,
            "retention_hours": maintenance.snapshot_retention_hours,
            "min_snapshots_to_keep": maintenance.min_snapshots_to_keep,
            "oldest_snapshot_ms": MetadataValue.int(oldest) if oldest is not None else MetadataValue.text("none"),
        }
    )


@asset(group_name=GROUP, deps=[trades_snapshot_history], kinds={"iceberg"}, metadata={"table": "market.trades"})
def trades_storage(
    context: AssetExecutionContext, iceberg: IcebergResource, maintenance: TableMaintenanceResource
) -> MaterializeResult:
    """The files under the location of ``market.trades``, cleaned of orphans: data, manifest and
    metadata files that no live snapshot references (debris of killed runs, files of expired
    snapshots and compacted-away files) and that are older than the grace period are deleted.
    """
    report = maintenance.remove_orphans(iceberg.trades())
    context.log.info(
        f"deleted {len(report.deleted)} unreferenced files ({report.bytes_deleted} bytes); "
        f"{len(report.kept_in_grace)} younger than the grace period kept"
    )
    return MaterializeResult(
        metadata={
            "files_listed": report.files_listed,
            "files_referenced": report.referenced,
            "orphans_deleted": len(report.deleted),
            "bytes_freed": MetadataValue.int(report.bytes_deleted),
            "orphans_in_grace_period": len(report.kept_in_grace),
            "grace_hours": maintenance.orphan_grace_hours,
            "deleted_sample": MetadataValue.json(list(report.deleted[:10])),
        }
    )


MAINTENANCE_ASSETS = [trades_file_layout, trades_snapshot_history, trades_storage]
