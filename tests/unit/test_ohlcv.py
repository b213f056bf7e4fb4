"""OHLCV math: bucket alignment, open/close order, VWAP, counts, local trading days, roll-ups."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import numpy as np
import polars as pl
import pytest

from k2_resources.analytics.ohlcv import (
    bar_violations,
    exchange_day_bounds,
    ohlcv_bars,
    roll_up,
    volume_by_interval,
)

UTC = UTC


def trades(rows: list[tuple]) -> pl.DataFrame:
    """rows of (symbol, exchange, timestamp, price, quantity, source_sequence)."""
    return pl.DataFrame(
        {
            "symbol": [r[0] for r in rows],
            "exchange": [r[1] for r in rows],
            "timestamp": [r[2] for r in rows],
            "price": [Decimal(str(r[3])) for r in rows],
            "quantity": [Decimal(str(r[4])) for r in rows],
            "source_sequence": [r[5] for r in rows],
            "platform_sequence": [None] * len(rows),
            "message_id": [f"m{i}" for i in range(len(rows))],
        },
        schema_overrides={
            "price": pl.Decimal(18, 8),
            "quantity": pl.Decimal(18, 8),
            "timestamp": pl.Datetime("us", "UTC"),
            "platform_sequence": pl.Int64,
        },
    )


def bar(bars: pl.DataFrame, interval: str, symbol: str, start: datetime) -> dict:
    found = bars.filter(
        (pl.col("interval") == interval) & (pl.col("symbol") == symbol) & (pl.col("bucket_start") == start)
    )
    assert found.height == 1, f"expected one {interval} bar of {symbol} at {start}, found {found.height}"
    return found.row(0, named=True)


def test_open_high_low_close_vwap_and_count_of_one_minute():
    t0 = datetime(2024, 8, 9, 0, 0, 10, tzinfo=UTC)
    bars = ohlcv_bars(
        trades(
            [
                ("BTCUSDT", "BINANCE", t0 + timedelta(seconds=5), 101, 1, 3),
                ("BTCUSDT", "BINANCE", t0, 100, 2, 1),  # first by time, though listed second
                ("BTCUSDT", "BINANCE", t0 + timedelta(seconds=20), 99.5, 4, 4),
                ("BTCUSDT", "BINANCE", t0 + timedelta(seconds=20), 102, 1, 5),  # same time: later sequence closes
                ("BTCUSDT", "BINANCE", t0 + timedelta(seconds=60), 200, 1, 6),  # next minute
            ]
        ),
        intervals=["1m"],
    )
    first = bar(bars, "1m", "BTCUSDT", datetime(2024, 8, 9, 0, 0, tzinfo=UTC))
    assert (first["open"], first["high"], first["low"], first["close"]) == (
        Decimal(100),
        Decimal(102),
        Decimal("99.5"),
        Decimal(102),
    )
    assert first["volume"] == Decimal(8) and first["trade_count"] == 4
    assert first["notional"] == Decimal(200 + 101 + 398 + 102)
    assert first["vwap"] == Decimal("100.125")
    assert first["bucket_end"] == datetime(2024, 8, 9, 0, 1, tzinfo=UTC)
    second = bar(bars, "1m", "BTCUSDT", datetime(2024, 8, 9, 0, 1, tzinfo=UTC))
    assert second["open"] == second["close"] == Decimal(200) and second["trade_count"] == 1


def test_buckets_align_to_5m_and_1h_and_symbols_stay_apart():
    t0 = datetime(2024, 8, 9, 10, 4, 59, tzinfo=UTC)
    bars = ohlcv_bars(
        trades(
            [
                ("BTCUSDT", "BINANCE", t0, 1, 1, 1),
                ("BTCUSDT", "BINANCE", t0 + timedelta(seconds=2), 2, 1, 2),  # 10:05:01, next 5m bucket
                ("ETHUSDT", "BINANCE", t0, 3, 1, 1),
                ("BTCUSDT", "BINANCE", datetime(2024, 8, 9, 11, 0, tzinfo=UTC), 4, 1, 3),
            ]
        )
    )
    assert bar(bars, "5m", "BTCUSDT", datetime(2024, 8, 9, 10, 0, tzinfo=UTC))["trade_count"] == 1
    assert bar(bars, "5m", "BTCUSDT", datetime(2024, 8, 9, 10, 5, tzinfo=UTC))["open"] == Decimal(2)
    hour = bar(bars, "1h", "BTCUSDT", datetime(2024, 8, 9, 10, 0, tzinfo=UTC))
    assert hour["trade_count"] == 2 and hour["close"] == Decimal(2)
    assert bar(bars, "1h", "ETHUSDT", datetime(2024, 8, 9, 10, 0, tzinfo=UTC))["trade_count"] == 1
    assert bar(bars, "1d", "BTCUSDT", datetime(2024, 8, 9, tzinfo=UTC))["trade_count"] == 3


def test_asx_day_is_the_sydney_trading_day_not_two_utc_halves():
    # 10:00 and 15:59 Sydney (AEDT, UTC+11) on 11 March 2014 fall on two UTC dates.
    bars = ohlcv_bars(
        trades(
            [
                ("BHP", "ASX", datetime(2014, 3, 10, 23, 0, tzinfo=UTC), 36.5, 100, 1),
                ("BHP", "ASX", datetime(2014, 3, 11, 4, 59, tzinfo=UTC), 36.9, 50, 2),
            ]
        )
    )
    start, end = exchange_day_bounds("ASX", "2014-03-11")
    assert (start, end) == (datetime(2014, 3, 10, 13, tzinfo=UTC), datetime(2014, 3, 11, 13, tzinfo=UTC))
    day = bar(bars, "1d", "BHP", start)
    assert day["bucket_end"] == end and day["trade_count"] == 2
    assert day["open"] == Decimal("36.5") and day["close"] == Decimal("36.9")
    assert exchange_day_bounds("BINANCE", "2024-08-09")[0] == datetime(2024, 8, 9, tzinfo=UTC)


def random_trades(count: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    start = datetime(2014, 3, 10, 21, 0, tzinfo=UTC)
    rows = []
    for i in range(count):
        rows.append(
            (
                ["BHP", "RIO"][i % 2],
                "ASX",
                start + timedelta(seconds=float(rng.uniform(0, 3 * 86400))),
                round(float(rng.uniform(30, 70)), 3),
                int(rng.integers(1, 5000)),
                i,
            )
        )
    return trades(rows)


@pytest.mark.parametrize("interval", ["5m", "1h", "1d"])
def test_rolled_up_bars_equal_bars_from_the_trades(interval):
    frame = random_trades(3000, seed=3)
    direct = ohlcv_bars(frame, intervals=[interval]).drop("computed_at")
    rolled = roll_up(ohlcv_bars(frame, intervals=["1m"]), interval).drop("computed_at")
    assert rolled.sort("symbol", "bucket_start").equals(direct.sort("symbol", "bucket_start"))


def test_sanity_rules_hold_and_volumes_add_up_in_every_interval():
    frame = random_trades(2000, seed=5)
    bars = ohlcv_bars(frame)
    assert bar_violations(bars) == {"high_below_open_or_close": 0, "low_above_open_or_close": 0}
    total = str(frame["quantity"].sum())
    assert volume_by_interval(bars) == {"1d": total, "1h": total, "1m": total, "5m": total}
    lowered = bars.with_columns(pl.col("low").alias("high"))
    assert bar_violations(lowered)["high_below_open_or_close"] > 0
    crossed = bars.with_columns(pl.col("open").alias("low"), pl.col("low").alias("open"))
    assert bar_violations(crossed)["low_above_open_or_close"] > 0
