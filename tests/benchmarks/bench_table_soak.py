"""Table soak benchmark (issue 21): does market.trades stay as fast after thousands of one-second
commits as after a few, with continuous maintenance as deployed? Writes bench-results/table_soak.json.

The follower's own commit path: each batch is produced to a real Kafka topic (3 partitions) and
committed by ``run_microbatch`` (what ``follow_topic`` runs per partition and cycle), back to back,
as fast as the machine allows: a follower catching up. A batch is one second of trades of its
partition (``ROWS_PER_BATCH`` rows, trade times one simulated second apart). Two runs, each on a
catalog and topic of its own: ``maintenance`` (ContinuousMaintenance on a thread, its commit
window granted between cycles as the follower's pause does) and ``baseline`` (none).

Per tenth of each run: commit p50/p99 (the Iceberg commit of ``run_microbatch``) and the whole
micro-batch p99; the hybrid ``recent_trades`` (15 simulated minutes) p99 and one symbol's whole day
p99 (``QUERY_RUNS`` runs each, from a long-lived HybridQueryResource); planning a full scan of a
freshly loaded table; and the table's health (metadata file bytes, manifests, data files, settled
files per partition, metadata folder bytes, data bytes). The run is committed at a few commits a
second, faster than the deployed one a second per partition, so the maintenance windows here are
scaled down (``SETTINGS``); the settled-file count uses the same window as the table_health check
(settle window plus one pass interval).

``K2_TABLE_SOAK_BATCHES`` sets the number of batches (default 3,600, over the 3 partitions);
``K2_TABLE_SOAK_BASELINE_BATCHES`` the baseline's (default 600: see the constant).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.kafka.resource import KafkaResource
from k2_resources.operations.continuous_maintenance import ContinuousMaintenance, MaintenanceSettings
from k2_resources.operations.settled_compaction import CompactionSettings
from k2_resources.operations.snapshot_policy import SnapshotPolicy
from k2_resources.operations.table_health import measure
from k2_resources.schemas import encode_trade
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support.bench_results import merge_bench_json
from tests.support.soak_rows import SYMBOLS, second_of_trades

BATCHES = int(os.environ.get("K2_TABLE_SOAK_BATCHES", "3600"))
# The baseline's commits slow down with every snapshot (linearly, so its run time grows with the square
# of the batches): it is stopped after this many batches, its tenths spread over them.
BASELINE_BATCHES = int(os.environ.get("K2_TABLE_SOAK_BASELINE_BATCHES", "600"))
PARTITIONS = 3
ROWS_PER_BATCH = 20
QUERY_RUNS = 5
TENTHS = 10
DAY_START = datetime(2024, 8, 9, tzinfo=UTC)
FIRST_SECOND = DAY_START + timedelta(hours=1)
SETTINGS = MaintenanceSettings(
    interval_s=5.0,
    compaction=CompactionSettings(settle_window_s=20.0, min_files=4),
    snapshots=SnapshotPolicy(exact_window_s=60.0, max_exact_snapshots=900, hourly_for_s=3600.0, retention_s=86400.0),
    orphan_interval_s=60.0,
    orphan_grace_s=30.0,
)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return 0.0
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(samples: list[float], q: float) -> float:
    return round(percentile(samples, q) * 1000, 1)


def timed(fn, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def produce_second(producer, topic: str, index: int) -> None:
    """Batch ``index`` of every partition: one simulated second of trades each."""
    second = FIRST_SECOND + timedelta(seconds=index)
    for partition in range(PARTITIONS):
        for row in second_of_trades(partition, index * ROWS_PER_BATCH, ROWS_PER_BATCH, second):
            producer.send(topic, key=row["symbol"].encode(), value=encode_trade(row), partition=partition)
    producer.flush()


def tenth_figures(
    iceberg: IcebergResource, hybrid: HybridQueryResource, index: int, commits: list[float], batches: list[float]
) -> dict:
    now = FIRST_SECOND + timedelta(seconds=index + 1)
    symbol = SYMBOLS[0][0]
    recent = timed(lambda: hybrid.recent_trades(symbol, 15, now=now), QUERY_RUNS)
    stats = hybrid.last_stats
    rows_recent = stats.iceberg_rows + stats.kafka_rows if stats is not None else 0
    day = timed(lambda: hybrid.trades([symbol], DAY_START, DAY_START + timedelta(days=1)), QUERY_RUNS)
    planning = timed(lambda: list(iceberg.trades().scan().plan_files()), 3)
    health = measure(iceberg.trades(), SETTINGS.compaction.settle_window_s + SETTINGS.interval_s)
    return {
        "batches_done": (index + 1) * PARTITIONS,
        "commit_p50_ms": ms(commits, 50),
        "commit_p99_ms": ms(commits, 99),
        "microbatch_p99_ms": ms(batches, 99),
        "recent_trades_15min_p99_ms": ms(recent, 99),
        "recent_trades_rows": rows_recent,
        "symbol_whole_day_p99_ms": ms(day, 99),
        "plan_full_scan_ms": ms(planning, 50),
        "metadata_file_bytes": health.metadata_file_bytes,
        "manifests": health.manifests,
        "snapshots": health.snapshots,
        "data_files": health.data_files,
        "max_files_per_partition": health.max_files_per_partition,
        "max_settled_files_per_partition": health.max_settled_files_per_partition,
        "unsettled_files": health.unsettled_files,
        "metadata_folder_bytes": health.metadata_folder_bytes,
        "data_bytes": health.data_bytes,
        "metadata_folder_over_data": round(health.metadata_folder_bytes / max(health.data_bytes, 1), 3),
    }


def soak(home: Path, kafka: KafkaResource, topic: str, with_maintenance: bool, batches_wanted: int) -> dict:
    (home / "warehouse").mkdir(parents=True)
    iceberg = IcebergResource(
        catalog_properties={
            "type": "sql",
            "uri": f"sqlite:///{home / 'catalog.db'}",
            "warehouse": f"file://{home / 'warehouse'}",
        }
    )
    iceberg.trades()
    kafka.ensure_topic(topic, partitions=PARTITIONS, config={"retention.ms": "-1"})
    hybrid = HybridQueryResource(kafka=kafka, iceberg=iceberg, topics=[topic])
    maintenance = ContinuousMaintenance(iceberg, SETTINGS, tables=(TRADES,)) if with_maintenance else None
    producer = kafka.producer()
    cycles = batches_wanted // PARTITIONS
    per_tenth = max(1, cycles // TENTHS)
    tenths: list[dict] = []
    commits: list[float] = []
    batches: list[float] = []
    started = time.perf_counter()
    if maintenance is not None:
        maintenance.start()
    try:
        for index in range(cycles):
            produce_second(producer, topic, index)
            for partition in range(PARTITIONS):
                begun = time.perf_counter()
                start = index * ROWS_PER_BATCH
                batch = run_microbatch(kafka, iceberg, OffsetRange(topic, partition, start, start + ROWS_PER_BATCH))
                assert not batch.already_committed and batch.written == ROWS_PER_BATCH
                commits.append(batch.commit_seconds)
                batches.append(time.perf_counter() - begun)
            if maintenance is not None:
                maintenance.window.between_cycles()  # what the follower's pause does between cycles
            if (index + 1) % per_tenth == 0 and len(tenths) < TENTHS:
                tenths.append(tenth_figures(iceberg, hybrid, index, commits, batches))
                tenths[-1]["elapsed_s"] = round(time.perf_counter() - started, 1)
                commits, batches = [], []
    finally:
        if maintenance is not None:
            maintenance.stop()
        producer.close()
    elapsed = time.perf_counter() - started
    table = iceberg.trades()
    ids = table.scan(selected_fields=("trade_id",)).to_arrow().column("trade_id")
    assert len(ids) == len(set(ids.to_pylist())) == cycles * PARTITIONS * ROWS_PER_BATCH  # exact
    assert committed_offsets(table, topic) == {p: cycles * ROWS_PER_BATCH for p in range(PARTITIONS)}
    hybrid.close()
    result: dict = {"seconds": round(elapsed, 1), "commits": cycles * PARTITIONS, "tenths": tenths}
    if maintenance is not None:
        passes = maintenance.passes
        result["maintenance"] = {
            "passes_kept": len(passes),
            "compaction_commits": sum(p.compaction.commits for p in passes if p.compaction),
            "compaction_conflicts": sum(p.compaction.conflicts for p in passes if p.compaction),
            "expiry_conflicts": sum(p.expiry.conflicts for p in passes if p.expiry),
            "failed_passes": sum(1 for p in passes if p.error),
            "follower_windows_granted": maintenance.window.granted,
            "follower_seconds_waiting_for_maintenance": round(maintenance.window.waited_s, 2),
        }
    first, last = tenths[0], tenths[-1]
    result["last_over_first"] = {
        key: round(last[key] / first[key], 2) if first[key] else None
        for key in ("commit_p99_ms", "recent_trades_15min_p99_ms", "symbol_whole_day_p99_ms", "plan_full_scan_ms")
    }
    worst = {
        key: max(t[key] for t in tenths)
        for key in (
            "metadata_file_bytes",
            "manifests",
            "max_settled_files_per_partition",
            "metadata_folder_bytes",
            "metadata_folder_over_data",
        )
    }
    result["worst_tenth"] = worst
    return result


@pytest.mark.timeout(7200)
def test_table_soak(tmp_path, kafka_broker, topic_name):
    kafka = KafkaResource()
    load = os.getloadavg()[0]
    results = {
        "batches": BATCHES,
        "baseline_batches": BASELINE_BATCHES,
        "partitions": PARTITIONS,
        "rows_per_batch": ROWS_PER_BATCH,
        "query_runs_per_tenth": QUERY_RUNS,
        "settings": {
            "interval_s": SETTINGS.interval_s,
            "settle_window_s": SETTINGS.compaction.settle_window_s,
            "min_files": SETTINGS.compaction.min_files,
            "snapshot_policy": SETTINGS.snapshots.describe(),
            "orphan_grace_s": SETTINGS.orphan_grace_s,
            "manifest_merge_count": SETTINGS.manifest_merge_count,
            "metadata_versions": SETTINGS.metadata_versions,
        },
        "load_average_at_start": round(load, 1),
    }
    results["with_maintenance"] = soak(tmp_path / "maintained", kafka, f"{topic_name}-m", True, BATCHES)
    results["baseline"] = soak(tmp_path / "baseline", kafka, f"{topic_name}-b", False, BASELINE_BATCHES)
    results["load_average_at_end"] = round(os.getloadavg()[0], 1)
    merge_bench_json("table_soak.json", results)
