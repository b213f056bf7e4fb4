"""OHLCV bars computed by Spark: the same bars as :func:`k2_resources.analytics.ohlcv.ohlcv_bars`, row for row.

Spark reads the trades straight from ``market.trades`` (a pinned snapshot, pruned by exchange and
time) and aggregates them; only the bars come back to Python. Every rule of the in-process engine
is reproduced exactly:

- buckets: 1m/5m/1h aligned in UTC (5m on the epoch), 1d the exchange's local calendar day;
- open/close: the first/last trade by (timestamp, source_sequence, platform_sequence, message_id),
  missing values last;
- notional: the sum of price * quantity, each product rounded half-to-even to 8 decimals
  (polars' decimal multiplication); volume and notional decimal(38, 8);
- VWAP: notional / volume rounded half-to-even to 8 decimals, computed in exact integer
  arithmetic (Spark's decimal division keeps only 6 decimals at this precision, and rounds
  half-up), or the close when the volume is 0.

pyspark is the optional ``spark`` extra, so it is imported by the functions that use it: without
it K2 loads and runs on the in-process engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import polars as pl
import pyarrow as pa

from k2_resources.analytics.ohlcv import EXCHANGE_TIME_ZONES, INTERVALS
from k2_resources.catalog.tables import OHLCV, OHLCV_SCHEMA, TRADES
from k2_resources.errors import K2Error
from k2_resources.trades.iceberg_read import RowFilter

_STEP_MICROS = {"1m": 60_000_000, "5m": 300_000_000, "1h": 3_600_000_000}
_SCALE = 100_000_000  # 10^8: the 8 decimals of prices, volumes and notionals


def read_trades_in_spark(spark: Any, catalog_name: str, snapshot_id: int | None, row_filter: RowFilter) -> Any:
    """A Spark DataFrame of market.trades at ``snapshot_id`` (None: current) matching ``row_filter``."""
    from pyspark.sql import functions as F

    reader = spark.read
    if snapshot_id is not None:
        reader = reader.option("snapshot-id", str(snapshot_id))
    frame = reader.table(f"{catalog_name}.{TRADES.identifier}")
    if row_filter.exchange is not None:
        frame = frame.where(F.col("exchange") == row_filter.exchange)
    if row_filter.symbols is not None:
        frame = frame.where(F.col("symbol").isin(list(row_filter.symbols)))
    if row_filter.start is not None:
        frame = frame.where(F.col("timestamp") >= F.lit(row_filter.start.astimezone(UTC)))
    if row_filter.end is not None:
        frame = frame.where(F.col("timestamp") < F.lit(row_filter.end.astimezone(UTC)))
    return frame


def _bucket_start(interval: str) -> Any:
    from pyspark.sql import functions as F

    if interval not in INTERVALS:
        raise K2Error(f"unknown interval {interval!r}; use one of {', '.join(INTERVALS)}")
    micros = F.unix_micros(F.col("timestamp"))
    if interval != "1d":
        return F.timestamp_micros(micros - F.pmod(micros, F.lit(_STEP_MICROS[interval])))
    expression = F.date_trunc("day", F.col("timestamp"))  # the session time zone is UTC
    for exchange, zone in EXCHANGE_TIME_ZONES.items():
        local_day = F.to_utc_timestamp(F.date_trunc("day", F.from_utc_timestamp(F.col("timestamp"), zone)), zone)
        expression = F.when(F.col("exchange") == exchange, local_day).otherwise(expression)
    return expression


def _bucket_end(interval: str) -> Any:
    from pyspark.sql import functions as F

    start = F.col("bucket_start")
    if interval != "1d":
        return F.timestamp_micros(F.unix_micros(start) + F.lit(_STEP_MICROS[interval]))
    expression = start + F.expr("INTERVAL 1 DAY")
    for exchange, zone in EXCHANGE_TIME_ZONES.items():
        local_next = F.to_utc_timestamp(F.from_utc_timestamp(start, zone) + F.expr("INTERVAL 1 DAY"), zone)
        expression = F.when(F.col("exchange") == exchange, local_next).otherwise(expression)
    return expression


def spark_ohlcv_bars(
    trades: Any, intervals: Iterable[str] = INTERVALS, computed_at: datetime | None = None
) -> pl.DataFrame:
    """Bars of every interval for the Spark DataFrame ``trades``, computed in Spark, in OHLCV's columns."""
    from pyspark.sql import functions as F

    frame = _trade_columns(trades)
    # The in-process engine's order within a bucket, missing values last.
    order = F.struct(
        F.col("timestamp"),
        F.col("source_sequence").isNull(),
        F.col("source_sequence"),
        F.col("platform_sequence").isNull(),
        F.col("platform_sequence"),
        F.col("message_id").isNull(),
        F.col("message_id"),
    )
    product = F.bround(F.col("price") * F.col("quantity"), 8).cast("decimal(38,8)")
    computed_at = (computed_at or datetime.now(UTC)).astimezone(UTC)
    intervals = list(intervals)
    if not intervals:
        return cast(pl.DataFrame, pl.from_arrow(OHLCV.arrow_schema().empty_table()))
    # One scan and one shuffle for every interval: each trade is exploded into one row per interval.
    buckets = F.explode(
        F.array(
            *[
                F.struct(F.lit(interval).alias("interval"), _bucket_start(interval).alias("bucket_start"))
                for interval in intervals
            ]
        )
    )
    grouped = (
        frame.withColumn("product", product)
        .withColumn("bucket", buckets)
        .select("*", "bucket.interval", "bucket.bucket_start")
        .drop("bucket")
        .groupBy("interval", "symbol", "exchange", "bucket_start")
        .agg(
            F.min_by("price", order).alias("open"),
            F.max("price").alias("high"),
            F.min("price").alias("low"),
            F.max_by("price", order).alias("close"),
            F.sum("quantity").cast("decimal(38,8)").alias("volume"),
            F.sum("product").cast("decimal(38,8)").alias("notional"),
            F.count(F.lit(1)).cast("bigint").alias("trade_count"),
            F.min("timestamp").alias("first_trade_at"),
            F.max("timestamp").alias("last_trade_at"),
        )
    )
    bucket_end = F.lit(None).cast("timestamp")
    for interval in intervals:
        bucket_end = F.when(F.col("interval") == interval, _bucket_end(interval)).otherwise(bucket_end)
    bars = _with_exact_vwap(grouped).select(
        "interval",
        "symbol",
        "exchange",
        "bucket_start",
        bucket_end.alias("bucket_end"),
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
        F.lit(computed_at).alias("computed_at"),
    )
    return _to_polars(bars)


def _trade_columns(trades: Any) -> Any:
    """The columns the bars need, typed as the in-process engine reads them; sequences a table lacks
    are null and a missing message id is empty (they only order trades within a bucket)."""
    from pyspark.sql import functions as F

    columns = set(trades.columns)
    return trades.select(
        "symbol",
        "exchange",
        "timestamp",
        F.col("price").cast("decimal(18,8)").alias("price"),
        F.col("quantity").cast("decimal(18,8)").alias("quantity"),
        *[
            (F.col(c) if c in columns else F.lit(None).cast("bigint")).alias(c)
            for c in ("source_sequence", "platform_sequence")
        ],
        (F.col("message_id") if "message_id" in columns else F.lit("")).alias("message_id"),
    )


def _to_polars(bars: Any) -> pl.DataFrame:
    """The Spark bars as a polars frame in OHLCV's schema and order."""
    arrow = bars.toArrow()
    names = [field.name for field in OHLCV_SCHEMA.fields]
    schema = OHLCV.arrow_schema()
    arrow = pa.table([arrow.column(name).cast(schema.field(name).type) for name in names], schema=schema)
    return cast(pl.DataFrame, pl.from_arrow(arrow)).sort("interval", "symbol", "bucket_start")


def _with_exact_vwap(bars: Any) -> Any:
    """``bars`` with a ``vwap`` column: notional / volume rounded half-to-even to 8 decimals (the close when
    the volume is 0).

    In units of 10^-8, q = N * 10^8 div V (integer division), r = N * 10^8 - q * V, and q is rounded up
    when 2r > V, or 2r == V and q is odd. Every step is an exact decimal(38, 0) or long."""
    from pyspark.sql import functions as F

    units = F.lit(_SCALE)
    with_parts = (
        bars.withColumn("_volume_units", (F.col("volume") * units).cast("decimal(38,0)"))
        .withColumn("_dividend", ((F.col("notional") * units).cast("decimal(38,0)") * units).cast("decimal(38,0)"))
        .withColumn("_quotient", F.expr("CASE WHEN _volume_units > 0 THEN _dividend div _volume_units END"))
        .withColumn(
            "_twice_remainder",
            (
                (F.col("_dividend") - F.col("_quotient").cast("decimal(38,0)") * F.col("_volume_units")).cast(
                    "decimal(38,0)"
                )
                * F.lit(2)
            ).cast("decimal(38,0)"),
        )
    )
    up = (F.col("_twice_remainder") > F.col("_volume_units")) | (
        (F.col("_twice_remainder") == F.col("_volume_units")) & (F.pmod(F.col("_quotient"), F.lit(2)) == 1)
    )
    rounded = F.col("_quotient") + F.when(up, F.lit(1)).otherwise(F.lit(0))
    vwap = (rounded.cast("decimal(18,0)") * F.lit(Decimal("0.00000001"))).cast("decimal(18,8)")
    return with_parts.withColumn(
        "vwap", F.when(F.col("volume") > 0, vwap).otherwise(F.col("close").cast("decimal(18,8)"))
    ).drop("_volume_units", "_dividend", "_quotient", "_twice_remainder")
