"""Prometheus gauges describing K2's Iceberg tables (rows, files, bytes, snapshots, layout).

They are defined in :mod:`k2_resources.metrics`, on K2's own registry (``REGISTRY``), so the
exporter that serves it (`k2 metrics`, port 9465) exports them once ``update_table_metrics`` has
run; the Grafana dashboard (infra/grafana/dashboards/k2.json) plots them. Totals come from the current
snapshot's summary (cheap); the per-partition layout needs the manifests, so it is optional.
"""

from __future__ import annotations

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import ALL_TABLES
from k2_resources.metrics import (
    TABLE_DATA_BYTES,
    TABLE_DATA_FILES,
    TABLE_MAX_FILES_PER_PARTITION,
    TABLE_RECORDS,
    TABLE_SNAPSHOTS,
)
from k2_resources.operations.maintenance import partition_stats


def update_table_metrics(iceberg: IcebergResource, with_layout: bool = True) -> dict[str, dict[str, float]]:
    """Set the gauges for every K2 table from its current snapshot; returns the values set."""
    values: dict[str, dict[str, float]] = {}
    for definition in ALL_TABLES:
        table = iceberg.table(definition)
        name = definition.identifier
        snapshot = table.current_snapshot()
        summary = snapshot.summary.additional_properties if snapshot and snapshot.summary else {}
        row = {
            "records": float(summary.get("total-records", 0)),
            "data_files": float(summary.get("total-data-files", 0)),
            "data_bytes": float(summary.get("total-files-size", 0)),
            "snapshots": float(len(table.snapshots())),
        }
        TABLE_RECORDS.labels(table=name).set(row["records"])
        TABLE_DATA_FILES.labels(table=name).set(row["data_files"])
        TABLE_DATA_BYTES.labels(table=name).set(row["data_bytes"])
        TABLE_SNAPSHOTS.labels(table=name).set(row["snapshots"])
        if with_layout:
            row["max_files_per_partition"] = float(max((s.files for s in partition_stats(table)), default=0))
            TABLE_MAX_FILES_PER_PARTITION.labels(table=name).set(row["max_files_per_partition"])
        values[name] = row
    return values
