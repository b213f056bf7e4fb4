"""Synthetic trades drawn from the real trades' distributions, for the benchmarks and tests.

ASX: the real March 2014 rows of each symbol and day, repeated ``scale`` times with each copy's
timestamps jittered within the gap to the next real trade, so the intraday profile, the skew
between symbols, prices and sizes stay those of the real data.

Binance: BTCUSDT and ETHUSDT series whose inter-arrival gaps, log returns, sizes and aggressor
sides are resampled from the recorded 2024-08-08/09 trades, in the real ratio of the two
symbols' trade counts, ending at a chosen instant.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl
import pyarrow as pa

from k2_resources.catalog.tables import TRADES
from k2_resources.paths import DATA_DIR

_SYDNEY_OFFSET_MARCH_2014 = timedelta(hours=11)  # AEDT, in force for all of 10-14 March 2014
_BINANCE_FILES = {
    "BTCUSDT": ("BTCUSDT-trades-2024-08-08.csv", "BTCUSDT-trades-2024-08-09.csv"),
    "ETHUSDT": ("ETHUSDT-trades-2024-08-08.csv", "ETHUSDT-trades-2024-08-09.csv"),
}


def _finish(frame: pl.DataFrame) -> pa.Table:
    """Polars rows -> Arrow in market.trades' exact schema (vendor_data null)."""
    arrow = frame.select(
        "message_id",
        "trade_id",
        "symbol",
        "exchange",
        "asset_class",
        "timestamp",
        pl.col("price").cast(pl.Decimal(18, 8)),
        pl.col("quantity").cast(pl.Decimal(18, 8)),
        "currency",
        "side",
        pl.lit(None, dtype=pl.List(pl.String)).alias("trade_conditions"),
        pl.col("source_sequence").cast(pl.Int64),
        "ingestion_timestamp",
        pl.lit(None, dtype=pl.Int64).alias("platform_sequence"),
    ).to_arrow()
    schema = TRADES.arrow_schema()
    arrow = arrow.append_column(schema.field("vendor_data"), pa.nulls(arrow.num_rows, schema.field("vendor_data").type))
    return arrow.cast(schema)


def real_asx_trades() -> pl.DataFrame:
    """symbol, timestamp (UTC), price, quantity of every real ASX trade."""
    symbols = dict(
        pl.read_csv(
            DATA_DIR / "asx" / "reference-data" / "company_info.csv", schema_overrides={"company_id": pl.String}
        )
        .select("company_id", "symbol")
        .iter_rows()
    )
    frames = []
    for path in sorted((DATA_DIR / "asx" / "trades").glob("*.csv")):
        raw = pl.read_csv(
            path,
            has_header=False,
            new_columns=["date", "time", "price", "volume", "code", "venue", "buyer"],
            schema_overrides={
                "date": pl.String,
                "time": pl.String,
                "price": pl.Float64,
                "volume": pl.Float64,
                "code": pl.String,
                "venue": pl.String,
                "buyer": pl.String,
            },
        )
        frames.append(
            raw.select(
                pl.lit(symbols[path.stem]).alias("symbol"),
                (
                    (pl.col("date") + " " + pl.col("time")).str.strptime(pl.Datetime("us"), "%m/%d/%Y %H:%M:%S%.3f")
                    - _SYDNEY_OFFSET_MARCH_2014
                )
                .dt.replace_time_zone("UTC")
                .alias("timestamp"),
                pl.col("price"),
                pl.col("volume").alias("quantity"),
            )
        )
    return pl.concat(frames).sort("symbol", "timestamp")


def asx_trades(scale: int, seed: int = 7) -> pa.Table:
    """``scale`` jittered copies of the real ASX trades (about 200K rows per copy)."""
    rng = np.random.default_rng(seed)
    real = real_asx_trades().with_columns(
        # The gap to the next trade of the symbol bounds each copy's jitter (1 s at most).
        (pl.col("timestamp").shift(-1).over("symbol") - pl.col("timestamp"))
        .dt.total_microseconds()
        .fill_null(0)
        .clip(0, 1_000_000)
        .alias("gap_us")
    )
    copies = []
    for copy in range(scale):
        jitter = (
            (rng.random(real.height) * real["gap_us"].to_numpy()).astype(np.int64)
            if copy
            else np.zeros(real.height, np.int64)
        )
        copies.append(
            real.with_columns(
                (pl.col("timestamp") + pl.duration(microseconds=pl.Series(jitter))).alias("timestamp"),
                pl.lit(copy).alias("copy"),
            )
        )
    frame = pl.concat(copies).sort("symbol", "timestamp").with_row_index("n")
    ingested = datetime.now(UTC)
    return _finish(
        frame.with_columns(
            (pl.lit("ASX-SYN-") + pl.col("n").cast(pl.String)).alias("message_id"),
            (pl.lit("ASX-SYN") + pl.col("n").cast(pl.String)).alias("trade_id"),
            pl.lit("ASX").alias("exchange"),
            pl.lit("equities").alias("asset_class"),
            pl.lit("AUD").alias("currency"),
            pl.lit("UNKNOWN").alias("side"),
            pl.col("n").cast(pl.Int64).alias("source_sequence"),
            pl.lit(ingested).dt.cast_time_unit("us").alias("ingestion_timestamp"),
        )
    )


def _real_binance(symbol: str) -> pl.DataFrame:
    frames = [pl.read_csv(DATA_DIR / "binance" / name) for name in _BINANCE_FILES[symbol]]
    return pl.concat(frames).sort("trade_id")


def binance_trades(rows: int, end: datetime, seed: int = 11) -> pl.DataFrame:
    """``rows`` BTCUSDT+ETHUSDT trades ending just before ``end``, sorted by timestamp.

    Polars frame of the V2 columns (price/quantity as float); pass it through
    :func:`to_trades_arrow` for Iceberg, or encode rows for Kafka.
    """
    rng = np.random.default_rng(seed)
    real = {symbol: _real_binance(symbol) for symbol in _BINANCE_FILES}
    total_real = sum(frame.height for frame in real.values())
    frames = []
    for symbol, frame in real.items():
        count = round(rows * frame.height / total_real) if symbol != "ETHUSDT" else rows - sum(f.height for f in frames)
        gaps = np.diff(frame["time_ms"].to_numpy()).clip(0, None) * 1000 + rng.integers(0, 1000, frame.height - 1)
        returns = np.diff(np.log(frame["price"].to_numpy()))
        pick = rng.integers(0, frame.height - 1, count)
        times_us = np.cumsum(gaps[pick])
        times_us = int(end.timestamp() * 1_000_000) - 1_000_000 - times_us[-1] + times_us
        # A random walk of resampled returns, anchored at the real last price.
        drawn = returns[pick]
        prices = frame["price"][-1] * np.exp(np.cumsum(drawn - drawn.mean()))
        decimals = 2
        frames.append(
            pl.DataFrame(
                {
                    "symbol": symbol,
                    "timestamp": pl.Series(times_us, dtype=pl.Int64).cast(pl.Datetime("us", "UTC")),
                    "price": np.round(prices, decimals),
                    "quantity": frame["qty"].to_numpy()[rng.integers(0, frame.height, count)],
                    "side": np.where(
                        frame["is_buyer_maker"].to_numpy()[rng.integers(0, frame.height, count)], "SELL", "BUY"
                    ),
                    "source_sequence": np.arange(count, dtype=np.int64) + 10_000_000_000,
                }
            )
        )
    ingested = datetime.now(UTC)
    return (
        pl.concat(frames)
        .sort("timestamp", "symbol")
        .with_columns(
            (pl.lit("BINANCE-") + pl.col("symbol") + "-" + pl.col("source_sequence").cast(pl.String)).alias(
                "message_id"
            ),
            (pl.lit("BINANCE-") + pl.col("source_sequence").cast(pl.String)).alias("trade_id"),
            pl.lit("BINANCE").alias("exchange"),
            pl.lit("crypto").alias("asset_class"),
            pl.lit("USDT").alias("currency"),
            pl.lit(ingested).dt.cast_time_unit("us").alias("ingestion_timestamp"),
        )
    )


def to_trades_arrow(frame: pl.DataFrame) -> pa.Table:
    """A :func:`binance_trades` frame in market.trades' Arrow schema."""
    return _finish(frame)


def to_records(frame: pl.DataFrame) -> list[dict]:
    """A :func:`binance_trades` frame as V2 record dicts for the Avro encoder."""
    from decimal import Decimal

    records = []
    for row in frame.iter_rows(named=True):
        records.append(
            {
                "message_id": row["message_id"],
                "trade_id": row["trade_id"],
                "symbol": row["symbol"],
                "exchange": row["exchange"],
                "asset_class": row["asset_class"],
                "timestamp": row["timestamp"],
                "price": Decimal(str(row["price"])),
                "quantity": Decimal(str(row["quantity"])),
                "currency": row["currency"],
                "side": row["side"],
                "trade_conditions": [],
                "source_sequence": row["source_sequence"],
                "ingestion_timestamp": row["ingestion_timestamp"],
                "platform_sequence": None,
                "vendor_data": None,
            }
        )
    return records


def append_in_chunks(table, rows: pa.Table, chunk_rows: int) -> int:
    """Append ``rows`` in commits of ``chunk_rows`` (each sorted by symbol, timestamp); returns commits."""
    commits = 0
    for offset in range(0, rows.num_rows, chunk_rows):
        chunk = rows.slice(offset, chunk_rows).sort_by([("symbol", "ascending"), ("timestamp", "ascending")])
        table.append(chunk)
        commits += 1
    return commits
