"""binance_live_bars: bars of the last hours read through the hybrid resource, Kafka tail included.

Real recorded Binance trades in a real topic, half of each partition committed to Iceberg; the
asset is materialised in a Dagster instance and its bars are compared with bars computed from the
produced trades themselves: volume and count with polars, and open, high, low, close and VWAP
with plain Python decimals over the produced records (nothing of the code under test).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from decimal import Decimal

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from k2_assets.analytics.live_bars import binance_live_bars
from k2_resources.analytics.live_bars import live_bars_table, stored_live_bars
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support.producing import Produced, produce
from tests.support.recorded import recorded_trades_in_time_order

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _materialise(instance: DagsterInstance, topic: str) -> tuple[dict, dict]:
    """One run of the asset; (its metadata as plain values, check name -> passed)."""
    hybrid = HybridQueryResource(topics=[topic], topic_exchanges={topic: ["BINANCE"]})
    result = materialize(
        [binance_live_bars],
        instance=instance,
        resources={"hybrid": hybrid},
        run_config={"ops": {"binance_live_bars": {"config": {"hours": 2.0}}}},
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    metadata = {k: v.value for k, v in event.materialization.metadata.items()}
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    return metadata, checks


def _truth(source: Produced) -> pl.DataFrame:
    """1m bars' symbol, minute, volume and count computed from the produced trades (the last 2 hours)."""
    trades = pl.DataFrame(
        [{"symbol": r["symbol"], "timestamp": r["timestamp"], "quantity": r["quantity"]} for r in source.rows]
    )
    end = trades["timestamp"].max().replace(second=0, microsecond=0) + timedelta(minutes=1)
    return (
        trades.filter(pl.col("timestamp") >= end - timedelta(hours=2))
        .group_by("symbol", pl.col("timestamp").dt.truncate("1m").alias("bucket_start"))
        .agg(
            pl.col("quantity").cast(pl.Decimal(38, 8)).sum().cast(pl.Decimal(38, 8)).alias("volume"),
            pl.len().cast(pl.Int64).alias("trade_count"),
        )
        .sort("symbol", "bucket_start")
    )


def _price_truth(source: Produced) -> dict[tuple[str, datetime], tuple[Decimal, Decimal, Decimal, Decimal, Decimal]]:
    """(symbol, minute) -> open, high, low, close and exact VWAP of the produced trades of the last
    2 hours; open and close are the first and last trade in time, then trade id, order."""
    newest = max(r["timestamp"] for r in source.rows)
    start = newest.replace(second=0, microsecond=0) + timedelta(minutes=1) - timedelta(hours=2)
    minutes: dict[tuple[str, datetime], list[dict]] = defaultdict(list)
    for r in source.rows:
        if r["timestamp"] >= start:
            minutes[(r["symbol"], r["timestamp"].replace(second=0, microsecond=0))].append(r)
    truth = {}
    for key, trades in minutes.items():
        trades.sort(key=lambda r: (r["timestamp"], r["source_sequence"]))
        prices = [Decimal(r["price"]) for r in trades]
        volume = sum(Decimal(r["quantity"]) for r in trades)
        notional = sum(Decimal(r["price"]) * Decimal(r["quantity"]) for r in trades)
        truth[key] = (prices[0], max(prices), min(prices), prices[-1], notional / volume)
    return truth


def _assert_prices_match(iceberg: IcebergResource, source: Produced) -> None:
    """The stored bars' open, high, low and close equal the source's; VWAP is the exact quotient to 8 places."""
    truth = _price_truth(source)
    stored = stored_live_bars(live_bars_table(iceberg.catalog())).to_dicts()
    assert {(b["symbol"], b["bucket_start"]) for b in stored} == set(truth)
    for bar in stored:
        open_, high, low, close, vwap = truth[(bar["symbol"], bar["bucket_start"])]
        assert (bar["open"], bar["high"], bar["low"], bar["close"]) == (open_, high, low, close), bar
        assert abs(bar["vwap"] - vwap) < Decimal("0.00000001"), (bar, vwap)


def _bars(iceberg: IcebergResource) -> pl.DataFrame:
    return (
        stored_live_bars(live_bars_table(iceberg.catalog()))
        .select(
            "symbol",
            "bucket_start",
            pl.col("volume").cast(pl.Decimal(38, 8)),
            "trade_count",
        )
        .sort("symbol", "bucket_start")
    )


def test_live_bars_include_the_kafka_tail_exactly_and_a_rerun_changes_nothing(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3, config={"retention.ms": "-1"})
    source = produce(kafka, topic_name, recorded_trades_in_time_order(per_symbol=900))
    ends = kafka.end_offsets(topic_name)
    boundary = {p: end // 2 for p, end in ends.items()}
    for partition, offset in boundary.items():
        run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, 0, offset))
    truth = _truth(source)
    instance = DagsterInstance.ephemeral()

    first, checks = _materialise(instance, topic_name)
    assert checks == {
        "volumes_match_hybrid_trades": True,
        "high_at_least_open_and_close": True,
        "low_at_most_open_and_close": True,
    }
    tail = sum(ends[p] - boundary[p] for p in ends)
    assert (first["kafka_rows"], first["iceberg_rows"]) == (tail, sum(boundary.values()))
    assert first["written"] is True and first["trades"] == len(source.rows)
    bars = _bars(iceberg)
    assert bars.height == truth.height > 1
    assert bars.equals(truth)
    _assert_prices_match(iceberg, source)
    snapshot = live_bars_table(iceberg.catalog()).current_snapshot().snapshot_id

    # Nothing new: the same window, the same bars, no write.
    second, checks = _materialise(instance, topic_name)
    assert all(checks.values()) and second["written"] is False and second["window"] == first["window"]
    assert _bars(iceberg).equals(bars)
    assert live_bars_table(iceberg.catalog()).current_snapshot().snapshot_id == snapshot

    # The tail commits: the trades move from Kafka to Iceberg and the bars stay the same.
    for partition in ends:
        run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, boundary[partition], ends[partition]))
    third, checks = _materialise(instance, topic_name)
    assert all(checks.values())
    assert (third["kafka_rows"], third["iceberg_rows"], third["written"]) == (0, len(source.rows), False)
    assert _bars(iceberg).equals(bars)

    # New trades in Kafka: new bars, written.
    seen = {r["message_id"] for r in source.rows}
    more = produce(
        kafka, topic_name, [r for r in recorded_trades_in_time_order(per_symbol=1200) if r["message_id"] not in seen]
    )
    fourth, checks = _materialise(instance, topic_name)
    assert all(checks.values()) and fourth["written"] is True and fourth["kafka_rows"] == len(more.rows)
    assert _bars(iceberg).equals(_truth(Produced(source.rows + more.rows)))
    _assert_prices_match(iceberg, Produced(source.rows + more.rows))
