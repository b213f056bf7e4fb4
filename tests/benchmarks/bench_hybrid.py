"""Hybrid query benchmark: 5M+ rows in Iceberg, 100K in the Kafka tail; writes bench-results/hybrid.json.

Data (synthetic, drawn from the real trades' distributions, see tests/support/synthetic.py): ASX = the real
10-14 March 2014 trades twice over (about 400K rows), Binance = 4.6M BTCUSDT/ETHUSDT trades
ending now, appended to market.trades in commits of 250K rows; then 120K more Binance trades
produced to a real Kafka topic (3 partitions, message timestamps = trade times), of which the
first 20K are committed to Iceberg by real micro-batches: 100K stay in the Kafka tail.

Each measurement reports p50/p99 over repeated runs after one warm-up (the cold first run is
reported too) and a baseline measured in the same run: DuckDB reading ALL the table's Parquet
files directly (read_parquet, no Iceberg metadata, no Kafka), with the same filter.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from k2_resources.analytics.ohlcv import TRADE_COLUMNS, exchange_day_bounds, ohlcv_bars
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.paths import PROJECT_ROOT
from k2_resources.schemas import encode_trade
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource
from k2_resources.trades.iceberg_read import RowFilter, ScanStats, SnapshotReader
from tests.support import synthetic

RESULTS = PROJECT_ROOT / "bench-results" / "hybrid.json"
ASX_SCALE = 2
BINANCE_ICEBERG_ROWS = 4_600_000
KAFKA_ROWS = 120_000
KAFKA_COMMITTED = 20_000
PARTITIONS = 3
RUNS = 40


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def timed(fn: Callable[[], object], runs: int) -> tuple[list[float], float, object]:
    """(warm samples in ms, cold first run in ms, last result)."""
    started = time.perf_counter()
    result = fn()
    cold = (time.perf_counter() - started) * 1000
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        samples.append((time.perf_counter() - started) * 1000)
    return samples, cold, result


def summary(samples: list[float], cold: float, baseline: list[float], **extra) -> dict:
    p99, baseline_p99 = percentile(samples, 99), percentile(baseline, 99)
    return {
        "p50_ms": round(percentile(samples, 50), 2),
        "p99_ms": round(p99, 2),
        "cold_ms": round(cold, 2),
        "baseline_p50_ms": round(percentile(baseline, 50), 2),
        "baseline_p99_ms": round(baseline_p99, 2),
        "ratio_to_baseline": round(p99 / baseline_p99, 3),
        "runs": len(samples),
        **extra,
    }


def build(kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> dict:
    """Fill market.trades and the topic; returns facts about the data."""
    started = time.perf_counter()
    table = iceberg.trades()
    asx = synthetic.asx_trades(ASX_SCALE)
    commits = synthetic.append_in_chunks(table, asx, 1_000_000)
    end = datetime.now(UTC)
    binance = synthetic.binance_trades(BINANCE_ICEBERG_ROWS + KAFKA_ROWS, end)
    commits += synthetic.append_in_chunks(
        iceberg.trades(), synthetic.to_trades_arrow(binance.head(BINANCE_ICEBERG_ROWS)), 250_000
    )
    built_iceberg = time.perf_counter() - started

    kafka.ensure_topic(topic, partitions=PARTITIONS)
    producer = kafka.producer()
    tail = binance.tail(KAFKA_ROWS)
    for index, record in enumerate(synthetic.to_records(tail)):
        producer.send(
            topic,
            key=record["symbol"].encode(),
            value=encode_trade(record),
            partition=index % PARTITIONS,
            timestamp_ms=int(record["timestamp"].timestamp() * 1000),
        )
    producer.flush()
    producer.close()
    for partition in range(PARTITIONS):
        run_microbatch(kafka, iceberg, OffsetRange(topic, partition, 0, KAFKA_COMMITTED // PARTITIONS))
    ends = kafka.end_offsets(topic)
    committed = committed_offsets(iceberg.trades(), topic)
    return {
        "iceberg_rows": asx.num_rows + BINANCE_ICEBERG_ROWS + sum(committed.values()),
        "asx_rows": asx.num_rows,
        "kafka_tail_rows": sum(ends[p] - committed.get(p, 0) for p in ends),
        "iceberg_commits": commits + PARTITIONS,
        "build_seconds": round(time.perf_counter() - started, 1),
        "iceberg_build_seconds": round(built_iceberg, 1),
        "data_end": tail["timestamp"].max(),
    }


def all_data_files(iceberg: IcebergResource) -> list[str]:
    table = iceberg.trades()
    return [task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()]


def row_groups_matching(files: list[str], symbol: str) -> tuple[int, int]:
    """(row groups whose symbol statistics admit ``symbol``, all row groups) over ``files``."""
    matching = total = 0
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        column = metadata.schema.names.index("symbol")
        for index in range(metadata.num_row_groups):
            stats = metadata.row_group(index).column(column).statistics
            total += 1
            if stats is None or not stats.has_min_max or stats.min <= symbol <= stats.max:
                matching += 1
    return matching, total


@pytest.mark.integration
def test_hybrid_query_benchmark(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    facts = build(kafka, iceberg, topic_name)
    assert facts["iceberg_rows"] >= 5_000_000 and facts["kafka_tail_rows"] >= 100_000
    files = all_data_files(iceberg)
    baseline = duckdb.connect()
    baseline.execute("SET TimeZone = 'UTC'")
    baseline.execute("SET threads = 2")
    baseline.execute("SET VARIABLE files = ?", [files])
    scan = "read_parquet(getvariable('files'), hive_partitioning = false)"

    hybrid = HybridQueryResource(topics=[topic_name])
    now = facts["data_end"]
    results: dict = {"data": {k: v for k, v in facts.items() if k != "data_end"}}
    results["data"]["data_files"] = len(files)

    # recent_trades: the last 15 minutes of BTCUSDT (in the Kafka tail) up to the end of the data.
    hybrid.recent_trades("BTCUSDT", 15, now=now)
    cold_tail = hybrid.last_stats.kafka
    hybrid.close()  # the timed runs start cold again, with a fresh consumer and an empty tail cache
    samples, cold, frame = timed(lambda: hybrid.recent_trades("BTCUSDT", 15, now=now), RUNS)
    stats = hybrid.last_stats
    start = now - timedelta(minutes=15)
    base, _, base_rows = timed(
        lambda: baseline.execute(
            f'SELECT * FROM {scan} WHERE symbol = ? AND "timestamp" >= ? AND "timestamp" <= ?', ["BTCUSDT", start, now]
        ).to_arrow_table(),
        RUNS,
    )
    results["recent_trades_15min"] = summary(
        samples,
        cold,
        base,
        rows=frame.height,
        iceberg_rows=stats.iceberg_rows,
        kafka_rows=stats.kafka_rows,
        files_planned=stats.iceberg.files_planned,
        files_total=stats.iceberg.files_total,
        baseline_rows_from_parquet_only=base_rows.num_rows,
        kafka_offsets_in_range=sum(e - s for s, e in stats.kafka.ranges.values()),
        cold_kafka_messages_decoded=cold_tail.fetched_messages,
        cold_kafka_poll_seconds=round(cold_tail.poll_seconds, 2),
        cold_kafka_decode_seconds=round(cold_tail.decode_seconds, 2),
    )
    assert frame.height > 10_000 and stats.kafka_rows == frame.height

    # The same across the Iceberg/Kafka boundary: the last 60 minutes.
    samples, cold, frame = timed(lambda: hybrid.recent_trades("BTCUSDT", 60, now=now), RUNS)
    stats = hybrid.last_stats
    results["recent_trades_60min_across_boundary"] = {
        "p50_ms": round(percentile(samples, 50), 2),
        "p99_ms": round(percentile(samples, 99), 2),
        "rows": frame.height,
        "iceberg_rows": stats.iceberg_rows,
        "kafka_rows": stats.kafka_rows,
    }
    assert stats.iceberg_rows > 0 and stats.kafka_rows > 0

    # Point query: one symbol, one (Sydney) trading day.
    day_start, day_end = exchange_day_bounds("ASX", "2014-03-12")
    samples, cold, frame = timed(lambda: hybrid.trades("BHP", day_start, day_end), RUNS)
    stats = hybrid.last_stats
    base, _, base_rows = timed(
        lambda: baseline.execute(
            f'SELECT * FROM {scan} WHERE symbol = ? AND "timestamp" >= ? AND "timestamp" < ?',
            ["BHP", day_start, day_end],
        ).to_arrow_table(),
        RUNS,
    )
    assert frame.height == base_rows.num_rows > 0
    planned = SnapshotReader().planned_files(
        iceberg.trades(), iceberg.trades().current_snapshot().snapshot_id, RowFilter(("BHP",), day_start, day_end)
    )
    matching, total_groups = row_groups_matching(planned, "BHP")
    results["point_query"] = summary(
        samples,
        cold,
        base,
        rows=frame.height,
        files_planned=stats.iceberg.files_planned,
        files_total=stats.iceberg.files_total,
        row_groups_admitting_symbol=matching,
        row_groups_in_planned_files=total_groups,
    )

    # OHLCV over all ASX trades (4 intervals): the K2 read path + polars vs DuckDB SQL on the files.
    reader = SnapshotReader()

    def k2_ohlcv() -> pl.DataFrame:
        table = iceberg.trades()
        trades = reader.read(
            table,
            table.current_snapshot().snapshot_id,
            RowFilter(exchange="ASX"),
            columns=TRADE_COLUMNS,
            exact_schema=False,
        )
        return ohlcv_bars(trades)

    samples, cold, bars = timed(k2_ohlcv, 8)
    # The baseline reads the ASX rows once, then aggregates each interval (ties in open/close by time only).
    interval_sql = (
        'WITH asx AS MATERIALIZED (SELECT symbol, "timestamp", price, quantity FROM '
        + scan
        + " WHERE exchange = 'ASX') "
        + " UNION ALL ".join(
            f"SELECT '{name}' AS interval, symbol, {bucket} AS bucket_start, arg_min(price, \"timestamp\") AS open, "
            f'max(price) AS high, min(price) AS low, arg_max(price, "timestamp") AS close, '
            f"sum(quantity) AS volume, sum(price::DECIMAL(38, 8) * quantity::DECIMAL(38, 8)) / sum(quantity) AS vwap, "
            f"count(*) AS trade_count FROM asx GROUP BY ALL"
            # Buckets on naive UTC timestamps, the Sydney day as a fixed +11h shift (AEDT for all of
            # 10-14 March 2014): DuckDB's time_bucket on TIMESTAMPTZ goes through ICU and takes seconds.
            for name, bucket in (
                ("1m", 'time_bucket(INTERVAL 1 minute, "timestamp"::TIMESTAMP)'),
                ("5m", 'time_bucket(INTERVAL 5 minute, "timestamp"::TIMESTAMP)'),
                ("1h", 'time_bucket(INTERVAL 1 hour, "timestamp"::TIMESTAMP)'),
                ("1d", 'time_bucket(INTERVAL 1 day, "timestamp"::TIMESTAMP + INTERVAL 11 hour) - INTERVAL 11 hour'),
            )
        )
    )
    base, _, base_bars = timed(lambda: baseline.execute(interval_sql).to_arrow_table(), 8)
    assert bars.height == base_bars.num_rows
    planned_stats = ScanStats()
    reader.planned_files(
        iceberg.trades(), iceberg.trades().current_snapshot().snapshot_id, RowFilter(exchange="ASX"), planned_stats
    )
    results["ohlcv_all_asx"] = summary(
        samples,
        cold,
        base,
        bars=bars.height,
        trades=facts["asx_rows"],
        files_planned=planned_stats.files_planned,
        files_total=planned_stats.files_total,
    )

    # The three Iceberg read paths on the same queries (the measurement that chose the default).
    table = iceberg.trades()
    snapshot_id = table.current_snapshot().snapshot_id
    queries = {
        "point_query": RowFilter(("BHP",), day_start, day_end),
        "btcusdt_last_60min_iceberg_part": RowFilter(("BTCUSDT",), now - timedelta(minutes=60), now),
        "all_asx_ohlcv_columns": RowFilter(exchange="ASX"),
    }
    paths: dict = {}
    for path in ("polars", "planned", "duckdb", "pyiceberg"):
        path_reader = SnapshotReader(read_path=path)  # type: ignore[arg-type]
        for name, row_filter in queries.items():
            columns = TRADE_COLUMNS if name.startswith("all_asx") else None
            runs = 5 if name.startswith("all_asx") else 15
            samples, cold, _ = timed(
                lambda reader=path_reader, where=row_filter, only=columns: reader.read_frame(
                    iceberg.trades(), snapshot_id, where, columns=only
                ),
                runs,
            )
            paths.setdefault(name, {})[path] = {
                "p50_ms": round(percentile(samples, 50), 2),
                "p99_ms": round(percentile(samples, 99), 2),
                "cold_ms": round(cold, 2),
            }
        path_reader.close()
    results["iceberg_read_paths"] = paths
    # Benchmarks report, they do not gate: the targets (recent_trades p99 < 500 ms, point query p99
    # < 100 ms) are judged by tests/support/bench_judge.py from tests/benchmarks/targets.toml.
    # Other engineers' test runs share the 2 cores: the load says how noisy the figures are.
    results["machine"] = {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(json.dumps(results, indent=2, default=str))
    hybrid.close()
