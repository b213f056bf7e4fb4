"""Table maintenance on a real Iceberg table: 500 micro-batch commits, then compaction, snapshot
expiry and orphan clean-up, with reads, time travel and committed offsets checked to be exact."""

from __future__ import annotations

import csv
import os
import shutil
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetSelection, DagsterInstance, Definitions

from k2_assets.operations.assets import MAINTENANCE_ASSETS, trades_file_layout
from k2_assets.operations.checks import MAINTENANCE_CHECKS
from k2_assets.operations.jobs import trades_table_maintenance_job, trades_table_maintenance_schedule
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.metrics import metrics_text
from k2_resources.operations.maintenance import (
    TableMaintenanceResource,
    compact_table,
    expire_snapshots,
    partition_stats,
    referenced_files,
    remove_orphan_files,
)
from k2_resources.operations.table_metrics import update_table_metrics
from k2_resources.paths import DATA_DIR
from k2_resources.query.duckdb_query import DuckDBQueryResource
from k2_resources.schemas import TradeV2, encode_trade
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offset_commit import commit_range
from k2_resources.sink.offsets import OffsetRange, committed_offsets, snapshot_committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource

pytestmark = pytest.mark.integration

TOPIC = BINANCE_TRADES_TOPIC
KAFKA_PARTITIONS = 2
RECORDINGS = (  # real Binance trades on three UTC days: three (day, exchange) partitions
    ("BTCUSDT", "BTCUSDT-trades-2023-04-05.csv"),
    ("BTCUSDT", "BTCUSDT-trades-2024-08-08.csv"),
    ("BTCUSDT", "BTCUSDT-trades-2024-08-09.csv"),
    ("ETHUSDT", "ETHUSDT-trades-2024-08-08.csv"),
    ("ETHUSDT", "ETHUSDT-trades-2024-08-09.csv"),
)
EXPIRE_EVERY = 50
PER_SYMBOL_SQL = (
    "SELECT symbol, count(*) AS trades, sum(quantity) AS volume, min(timestamp) AS first, "
    "max(timestamp) AS last FROM market.trades GROUP BY symbol ORDER BY symbol"
)


def recorded_streams() -> list[list[dict]]:
    """Each recording as V2 trade records, in the recording's order."""
    ingested = datetime.now(UTC)
    streams = []
    for symbol, name in RECORDINGS:
        with open(DATA_DIR / "binance" / name) as handle:
            streams.append(
                [
                    TradeV2(
                        message_id=f"BINANCE-{symbol}-{row['trade_id']}",
                        trade_id=f"BINANCE-{row['trade_id']}",
                        symbol=symbol,
                        exchange="BINANCE",
                        asset_class="crypto",
                        timestamp=datetime.fromtimestamp(int(row["time_ms"]) / 1000, tz=UTC),
                        price=Decimal(row["price"]),
                        quantity=Decimal(row["qty"]),
                        currency="USDT",
                        side="SELL" if row["is_buyer_maker"] == "true" else "BUY",
                        source_sequence=int(row["trade_id"]),
                        ingestion_timestamp=ingested,
                    ).to_record()
                    for row in csv.DictReader(handle)
                ]
            )
    return streams


def commit_micro_batches(
    iceberg: IcebergResource, commits: int, expire_every: int | None = None
) -> tuple[int, dict[int, int], list[int], list[float]]:
    """``commits`` exactly-once micro-batches over two Kafka partitions, each touching every day.

    With ``expire_every``, snapshot expiry runs during ingest (as the maintenance schedule
    would), keeping the newest ``expire_every`` snapshots: pyiceberg copies the whole table
    metadata several times per commit, so a commit's cost grows with the snapshots kept.
    Returns (records committed, end offset per partition, snapshot id and seconds of each commit).
    """
    streams = recorded_streams()
    ends = {partition: 0 for partition in range(KAFKA_PARTITIONS)}
    snapshots, seconds, total = [], [], 0
    for index in range(commits):
        records = [
            r
            for stream in streams
            for r in stream[index * len(stream) // commits : (index + 1) * len(stream) // commits]
        ]
        partition = index % KAFKA_PARTITIONS
        start = ends[partition]
        for offset, record in enumerate(records, start=start):
            record["platform_sequence"] = offset  # the Kafka offset, as read_range sets it
        started = time.perf_counter()
        result = commit_range(iceberg, OffsetRange(TOPIC, partition, start, start + len(records)), records)
        seconds.append(time.perf_counter() - started)
        assert result.written == len(records) > 0 and not result.already_committed
        ends[partition] += len(records)
        snapshots.append(result.snapshot_id)
        total += len(records)
        if expire_every and (index + 1) % expire_every == 0 and index + 1 < commits:
            expire_snapshots(
                iceberg.trades(), older_than=datetime.now(UTC) + timedelta(seconds=1), retain_last=expire_every
            )
    return total, ends, snapshots, seconds


def all_rows(iceberg: IcebergResource, snapshot_id: int | None = None) -> pa.Table:
    return iceberg.trades().scan(snapshot_id=snapshot_id).to_arrow().sort_by("message_id")


def local_path(location: str) -> Path:
    return Path(urlparse(location).path)


def test_compaction_after_500_commits_keeps_reads_exact_then_expiry_and_orphan_cleanup(k2_home):
    iceberg = IcebergResource()
    duckdb = DuckDBQueryResource(iceberg=iceberg)
    started = time.perf_counter()
    total, ends, snapshots, seconds = commit_micro_batches(iceberg, 500, expire_every=EXPIRE_EVERY)
    commit_seconds = time.perf_counter() - started

    table = iceberg.trades()
    before_stats = partition_stats(table)
    assert len(before_stats) == 3
    assert min(s.files for s in before_stats) >= 400  # every commit wrote a small file per partition
    rows_before = all_rows(iceberg)
    assert rows_before.num_rows == total
    per_symbol_before = duckdb.query(PER_SYMBOL_SQL)
    offsets_before = committed_offsets(table, TOPIC)
    assert offsets_before == ends
    last_commit = table.current_snapshot().snapshot_id
    mid_snapshot = snapshots[-EXPIRE_EVERY - 1]  # an older snapshot still kept
    mid_rows = all_rows(iceberg, mid_snapshot)
    assert 0 < mid_rows.num_rows < total
    bytes_before = sum(s.total_bytes for s in before_stats)

    started = time.perf_counter()
    report = compact_table(table)
    compaction_seconds = time.perf_counter() - started

    # A handful of files per partition, sorted by symbol then timestamp, and nothing else changed.
    table = iceberg.trades()
    after_stats = partition_stats(table)
    assert [s.partition for s in after_stats] == [s.partition for s in before_stats]
    assert max(s.files for s in after_stats) <= 3
    assert report.records_rewritten == total and report.files_removed == sum(s.files for s in before_stats)
    assert report.commits == 1  # all three partitions fit one rewrite: one atomic snapshot
    assert all_rows(iceberg).equals(rows_before)
    assert duckdb.query(PER_SYMBOL_SQL).equals(per_symbol_before)
    assert committed_offsets(table, TOPIC) == offsets_before
    assert snapshot_committed_offsets(table, table.current_snapshot(), TOPIC) == offsets_before
    assert table.current_snapshot().summary.additional_properties["k2.maintenance"] == "compaction"
    for path in table.inspect.files().column("file_path").to_pylist():
        keys = pq.read_table(local_path(path), columns=["symbol", "timestamp"])
        assert keys.equals(keys.sort_by([("symbol", "ascending"), ("timestamp", "ascending")]))
    # Time travel to snapshots before the compaction reads exactly what it read before.
    assert all_rows(iceberg, last_commit).equals(rows_before)
    assert all_rows(iceberg, mid_snapshot).equals(mid_rows)
    # A second pass finds nothing to do.
    assert compact_table(table).commits == 0

    # Expiry: everything older than now except the newest two snapshots of the lineage.
    snapshots_before_expiry = len(table.snapshots())
    expiry = expire_snapshots(table, older_than=datetime.now(UTC) + timedelta(seconds=1), retain_last=2)
    table = iceberg.trades()
    assert snapshots_before_expiry == 2 * EXPIRE_EVERY + 1 and expiry.snapshots_after == 2 == len(table.snapshots())
    assert table.snapshot_by_id(mid_snapshot) is None
    assert table.snapshot_by_id(last_commit) is not None  # the compaction's parent is the second newest
    assert committed_offsets(table, TOPIC) == offsets_before  # the table property outlives the snapshots
    assert all_rows(iceberg).equals(rows_before)

    # Orphans: drop debris into the data folder; within the grace period it stays, after it goes.
    data_dir = local_path(table.location()) / "data" / "timestamp_day=2024-08-09" / "exchange=BINANCE"
    debris = data_dir / "00000-0-debris-of-a-killed-run.parquet"
    shutil.copyfile(local_path(table.inspect.files().column("file_path")[0].as_py()), debris)
    kept = remove_orphan_files(table, grace=timedelta(hours=1))
    assert str(debris) in kept.kept_in_grace and not kept.deleted and debris.exists()

    old = time.time() - 2 * 3600
    os.utime(debris, (old, old))
    cleaned = remove_orphan_files(table, grace=timedelta(hours=1))
    assert cleaned.deleted == (str(debris),) and not debris.exists()

    # With no grace period, every unreferenced file goes: old manifests, manifest lists, metadata.
    swept = remove_orphan_files(table, grace=timedelta(0))
    table = iceberg.trades()
    live = referenced_files(table)
    on_disk = {str(p) for p in local_path(table.location()).rglob("*") if p.is_file()}
    assert swept.deleted and on_disk == live  # nothing referenced was deleted, nothing unreferenced is left
    parquet_on_disk = {p for p in on_disk if p.endswith(".parquet")}
    # The last micro-batch snapshot is kept, and it still reads the small files.
    assert len(parquet_on_disk) == sum(s.files for s in before_stats) + sum(s.files for s in after_stats)
    assert all_rows(iceberg, last_commit).equals(rows_before)

    # Once that snapshot expires too, the compacted-away files are orphans and go.
    expire_snapshots(table, older_than=datetime.now(UTC) + timedelta(seconds=1), retain_last=1)
    final = remove_orphan_files(iceberg.trades(), grace=timedelta(0))
    table = iceberg.trades()
    on_disk = {str(p) for p in local_path(table.location()).rglob("*") if p.is_file()}
    assert on_disk == referenced_files(table)
    assert len([p for p in final.deleted if p.endswith(".parquet")]) == sum(s.files for s in before_stats)
    assert len([p for p in on_disk if p.endswith(".parquet")]) == sum(s.files for s in after_stats)
    assert all_rows(iceberg).equals(rows_before)
    assert duckdb.query(PER_SYMBOL_SQL).equals(per_symbol_before)
    assert committed_offsets(table, TOPIC) == offsets_before

    bytes_after = sum(s.total_bytes for s in partition_stats(table))
    print(
        f"\n500 commits of {total} trades in {commit_seconds:.1f}s; compaction {compaction_seconds:.1f}s; "
        f"files {sum(s.files for s in before_stats)} -> {sum(s.files for s in after_stats)}; "
        f"data bytes/row {bytes_before / total:.1f} -> {bytes_after / total:.1f}; "
        f"orphans deleted {len(swept.deleted) + len(final.deleted)} "
        f"({swept.bytes_deleted + final.bytes_deleted} bytes); mean commit "
        f"{sum(seconds[:50]) / 50:.3f}s (first 50) {sum(seconds[-50:]) / 50:.3f}s (last 50)"
    )


def maintenance_definitions(maintenance: TableMaintenanceResource) -> Definitions:
    """The operations domain's own assets, checks, job and schedule with test settings."""
    return Definitions(
        assets=MAINTENANCE_ASSETS,
        asset_checks=MAINTENANCE_CHECKS,
        jobs=[trades_table_maintenance_job],
        schedules=[trades_table_maintenance_schedule],
        resources={"iceberg": IcebergResource(), "maintenance": maintenance},
    )


def test_maintenance_job_compacts_and_its_checks_go_from_warn_to_pass(k2_home):
    iceberg = IcebergResource()
    total, ends, _, _ = commit_micro_batches(iceberg, 24)
    rows_before = all_rows(iceberg)
    maintenance = TableMaintenanceResource(
        min_small_files=5,
        max_files_per_partition=8,
        snapshot_retention_hours=0,
        min_snapshots_to_keep=1,
        orphan_grace_hours=0,
    )
    defs = maintenance_definitions(maintenance)
    job = defs.resolve_job_def("trades_table_maintenance")
    assert job.tags["k2/kind"] == "maintenance"
    schedule = defs.resolve_schedule_def("trades_table_maintenance_nightly")
    assert schedule.default_status.value == "STOPPED"

    with DagsterInstance.ephemeral() as instance:
        checks_only = defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_check_selection=AssetSelection.checks_for_assets(trades_file_layout).resolve_checks(
                defs.resolve_asset_graph()
            )
        )
        before = checks_only.execute_in_process(instance=instance)
        evaluations = {e.check_name: e for e in before.get_asset_check_evaluations()}
        assert evaluations["small_files_per_partition"].passed is False
        assert evaluations["files_per_partition"].passed is False
        assert evaluations["small_files_per_partition"].severity.value == "WARN"

        result = job.execute_in_process(instance=instance)
        assert result.success
        after = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert after["small_files_per_partition"].passed is True
        assert after["files_per_partition"].passed is True
        layout = result.asset_materializations_for_node("trades_file_layout")[0].metadata
        assert layout["records_rewritten"].value == total
        assert layout["max_files_in_a_partition"].value <= 3
        history = result.asset_materializations_for_node("trades_snapshot_history")[0].metadata
        assert history["snapshots_kept"].value == 1  # only the compaction snapshot
        storage = result.asset_materializations_for_node("trades_storage")[0].metadata
        assert storage["orphans_deleted"].value >= 24 * 3  # the compacted-away small files

    table = iceberg.trades()
    assert all_rows(iceberg).equals(rows_before)
    assert committed_offsets(table, TOPIC) == ends
    # The exporter's table gauges read the same state.
    gauges = update_table_metrics(iceberg)["market.trades"]
    assert gauges["records"] == total and gauges["snapshots"] == 1
    assert gauges["data_files"] == len(table.inspect.files()) and gauges["max_files_per_partition"] <= 3
    assert f'k2_iceberg_table_records{{table="market.trades"}} {float(total)}' in metrics_text()
    assert {str(p) for p in local_path(table.location()).rglob("*") if p.is_file()} == referenced_files(table)


def test_hybrid_reads_are_identical_across_compaction(k2_home, kafka_broker, topic_name):
    """Real Kafka -> Iceberg micro-batches with a tail left in Kafka: compaction changes no hybrid read."""
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=KAFKA_PARTITIONS)
    records = [r for stream in recorded_streams() for r in stream[:500]]  # 2,500 trades on three days
    producer = kafka.producer()
    for index, record in enumerate(records):
        producer.send(
            topic_name, key=record["symbol"].encode(), value=encode_trade(record), partition=index % KAFKA_PARTITIONS
        )
    producer.flush()
    producer.close()
    per_partition, batch, tail = len(records) // KAFKA_PARTITIONS, 100, 250
    for start in range(0, per_partition - tail, batch):
        for partition in range(KAFKA_PARTITIONS):
            end = min(start + batch, per_partition - tail)
            assert run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, start, end)).written == end - start

    def hybrid_read() -> tuple[pa.Table, pa.Table, dict, tuple[int, int]]:
        hybrid = HybridQueryResource(kafka=kafka, iceberg=iceberg, topics=[topic_name])
        try:
            everything = hybrid.trades_arrow(None)
            stats = hybrid.last_stats
            newest = max(r["timestamp"] for r in records if r["symbol"] == "ETHUSDT")
            recent = hybrid.recent_trades_arrow("ETHUSDT", minutes=3, now=newest)
            return everything, recent, stats.committed, (stats.iceberg_rows, stats.kafka_rows)
        finally:
            hybrid.close()

    everything, recent, committed, split = hybrid_read()
    assert everything.num_rows == len(records) and split == (
        len(records) - tail * KAFKA_PARTITIONS,
        tail * KAFKA_PARTITIONS,
    )
    assert recent.num_rows > 0
    before_compaction = iceberg.trades().current_snapshot().snapshot_id

    report = compact_table(iceberg.trades(), min_small_files=5)
    assert report.commits >= 1 and report.files_removed > report.files_added

    assert hybrid_read() == (everything, recent, committed, split)
    as_of = HybridQueryResource(kafka=kafka, iceberg=iceberg, topics=[topic_name])
    try:
        old = as_of.trades_arrow(None, as_of=before_compaction)
        new = as_of.trades_arrow(None, as_of=iceberg.trades().current_snapshot().snapshot_id)
    finally:
        as_of.close()
    assert old.num_rows == len(records) - tail * KAFKA_PARTITIONS and old.equals(new)
