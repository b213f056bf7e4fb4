"""OHLCV assets materialised by Dagster over a real Iceberg catalog (and real Kafka for Binance)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from k2_assets.analytics import asx_ohlcv, binance_ohlcv
from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.analytics.ohlcv import exchange_day_bounds, ohlcv_table
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from tests.support.producing import produce
from tests.support.recorded import recorded_trades_in_time_order
from tests.support.synthetic import asx_trades

pytestmark = pytest.mark.integration

COMPARED = [
    "interval",
    "symbol",
    "exchange",
    "bucket_start",
    "bucket_end",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "notional",
    "vwap",
    "trade_count",
    "first_trade_at",
    "last_trade_at",
]


IN_PROCESS = AnalyticsEngineResource(
    engine="polars"
)  # the bars' default engine (Spark's: tests/integration/test_spark.py)
STEP_SECONDS = {"1m": 60, "5m": 300, "1h": 3600}
DAY_ZONES = {"ASX": ZoneInfo("Australia/Sydney")}  # other exchanges: the UTC day


def _bucket(timestamp: datetime, exchange: str, interval: str) -> tuple[datetime, datetime]:
    if interval in STEP_SECONDS:
        step = STEP_SECONDS[interval]
        start = datetime.fromtimestamp(int(timestamp.timestamp()) // step * step, tz=UTC)
        return start, start + timedelta(seconds=step)
    zone = DAY_ZONES.get(exchange, UTC)
    local = timestamp.astimezone(zone)
    day = datetime(local.year, local.month, local.day, tzinfo=zone)
    return day.astimezone(UTC), (day + timedelta(days=1)).astimezone(UTC)


def independent_bars(trades: list[dict]) -> dict[tuple, dict]:
    """OHLCV bars in plain Python (Decimal arithmetic, calendar days by zoneinfo), not the asset's code.

    Trades are ordered by time, then source sequence (missing last), then message id.
    """
    ordered = sorted(
        trades,
        key=lambda t: (
            t["timestamp"],
            t["source_sequence"] is None,
            t["source_sequence"] or 0,
            t["platform_sequence"] is None,
            t["platform_sequence"] or 0,
            t["message_id"],
        ),
    )
    bars: dict[tuple, dict] = {}
    for trade in ordered:
        price, quantity = Decimal(trade["price"]), Decimal(trade["quantity"])
        for interval in ("1m", "5m", "1h", "1d"):
            start, end = _bucket(trade["timestamp"], trade["exchange"], interval)
            bar = bars.setdefault(
                (interval, trade["symbol"], start),
                {
                    "bucket_end": end,
                    "open": price,
                    "high": price,
                    "low": price,
                    "volume": Decimal(0),
                    "notional": Decimal(0),
                    "trade_count": 0,
                    "first_trade_at": trade["timestamp"],
                },
            )
            bar["high"], bar["low"], bar["close"] = max(bar["high"], price), min(bar["low"], price), price
            bar["volume"] += quantity
            bar["notional"] += price * quantity
            bar["trade_count"] += 1
            bar["last_trade_at"] = trade["timestamp"]
    for bar in bars.values():
        bar["vwap"] = bar["notional"] / bar["volume"] if bar["volume"] else bar["close"]
    return bars


def assert_bars_match_trades(stored: pl.DataFrame, trades: list[dict]) -> None:
    """Every stored bar equals the independent computation (notional and VWAP to the 8 stored decimals)."""
    expected = independent_bars(trades)
    got = {(row["interval"], row["symbol"], row["bucket_start"]): row for row in stored.to_dicts()}
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        for name in (
            "bucket_end",
            "open",
            "high",
            "low",
            "close",
            "volume",
            "trade_count",
            "first_trade_at",
            "last_trade_at",
        ):
            assert have[name] == want[name], (key, name, have[name], want[name])
        for name in ("notional", "vwap"):
            assert abs(have[name] - want[name]) < Decimal("1e-8"), (key, name, have[name], want[name])


def stored_bars(iceberg: IcebergResource, exchange: str) -> pl.DataFrame:
    rows = ohlcv_table(iceberg.catalog()).scan().to_arrow()
    return (
        pl.from_arrow(rows)
        .filter(pl.col("exchange") == exchange)
        .select(COMPARED)
        .sort("interval", "symbol", "bucket_start")
    )


def test_asx_bars_of_a_trading_day_replace_and_pass_their_checks(k2_home):
    iceberg = IcebergResource()
    real = asx_trades(scale=1)  # the real ASX trades (copy 0 is unjittered) as V2 rows
    iceberg.trades().append(real)
    resources = {"iceberg": iceberg, "analytics": IN_PROCESS}

    for _ in range(2):  # the second run must replace, not add
        result = materialize([asx_ohlcv], partition_key="2014-03-11", resources=resources)
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(checks) == {"high_at_least_open_and_close", "low_at_most_open_and_close", "volumes_add_up_to_trades"}
        assert all(check.passed for check in checks.values()), {n: c.metadata for n, c in checks.items()}

    start, end = exchange_day_bounds("ASX", "2014-03-11")
    day = pl.from_arrow(real).filter((pl.col("timestamp") >= start) & (pl.col("timestamp") < end))
    bars = stored_bars(iceberg, "ASX")
    assert_bars_match_trades(bars, day.to_dicts())
    daily = bars.filter((pl.col("interval") == "1d") & (pl.col("symbol") == "BHP")).row(0, named=True)
    bhp = day.filter(pl.col("symbol") == "BHP").sort("timestamp", "source_sequence")
    assert daily["trade_count"] == bhp.height > 1000
    assert daily["open"] == bhp["price"][0] and daily["close"] == bhp["price"][-1]
    assert daily["bucket_start"] == start  # the Sydney day, one bar


def test_binance_bars_follow_micro_batches_incrementally_and_exactly(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3, config={"retention.ms": "-1"})
    produce(kafka, topic_name, recorded_trades_in_time_order(), record_timestamps=True)
    ends = kafka.end_offsets(topic_name)
    # Uneven cuts, so that batches end inside minutes and buckets are split between runs.
    cuts = {p: [0, end // 3, 2 * end // 3 + 7, end] for p, end in ends.items()}
    resources = {"iceberg": iceberg, "analytics": IN_PROCESS}

    with DagsterInstance.ephemeral() as instance:
        for index in range(3):
            for partition, points in cuts.items():
                run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, points[index], points[index + 1]))
            end = sum(points[index + 1] for points in cuts.values())
            result = materialize([binance_ohlcv], resources=resources, instance=instance)
            assert result.success
            checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
            assert all(check.passed for check in checks.values()), {n: c.metadata for n, c in checks.items()}
            metadata = instance.get_latest_materialization_event(
                AssetKey("binance_ohlcv")
            ).asset_materialization.metadata
            assert metadata["how"].value.startswith("appended since" if index else "full recompute")

            held = iceberg.trades().scan().to_arrow().to_pylist()
            assert len(held) == end
            assert_bars_match_trades(stored_bars(iceberg, "BINANCE"), held)

        # Nothing new: a run changes nothing.
        before = ohlcv_table(iceberg.catalog()).current_snapshot().snapshot_id
        assert materialize([binance_ohlcv], resources=resources, instance=instance).success
        assert ohlcv_table(iceberg.catalog()).current_snapshot().snapshot_id == before


def test_k2_query_ohlcv_prints_the_stored_bars(k2_home, capsys):
    from k2_assets.cli import main

    iceberg = IcebergResource()
    iceberg.trades().append(asx_trades(scale=1))
    assert materialize(
        [asx_ohlcv], partition_key="2014-03-12", resources={"iceberg": iceberg, "analytics": IN_PROCESS}
    ).success
    start, end = exchange_day_bounds("ASX", "2014-03-12")
    assert (
        main(
            [
                "query",
                "ohlcv",
                "--symbol",
                "RIO",
                "--interval",
                "1h",
                "--start",
                start.isoformat(),
                "--end",
                end.isoformat(),
                "--format",
                "json",
            ]
        )
        == 0
    )
    import json

    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    stored = stored_bars(iceberg, "ASX").filter((pl.col("interval") == "1h") & (pl.col("symbol") == "RIO"))
    assert len(printed) == stored.height > 5
    assert [p["trade_count"] for p in printed] == stored["trade_count"].to_list()


def test_k2_query_sql_reads_market_ohlcv(k2_home, capsys):
    """market.ohlcv is one of the DuckDB views: empty before any bars, the stored bars after."""
    import json

    from k2_assets.cli import main

    sql = "select count(*) as bars, count(distinct symbol) as symbols from market.ohlcv where interval = '1d'"
    assert main(["query", "sql", sql, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bars": 0, "symbols": 0}

    iceberg = IcebergResource()
    iceberg.trades().append(asx_trades(scale=1))
    assert materialize(
        [asx_ohlcv], partition_key="2014-03-12", resources={"iceberg": iceberg, "analytics": IN_PROCESS}
    ).success
    assert main(["query", "sql", sql, "--format", "json"]) == 0
    daily = stored_bars(iceberg, "ASX").filter(pl.col("interval") == "1d")
    assert daily.height > 1
    assert json.loads(capsys.readouterr().out) == {"bars": daily.height, "symbols": daily["symbol"].n_unique()}
