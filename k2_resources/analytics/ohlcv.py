"""OHLCV bars (open, high, low, close, volume, VWAP, trade count) per symbol and interval.

One Iceberg table, ``market.ohlcv``, holds every interval (an ``interval`` column: 1m, 5m, 1h,
1d), so that one run replaces all intervals of the buckets it recomputes in ONE commit: a
reader never sees the 1m bars of a new batch next to stale 1h bars.

Buckets: 1m, 5m and 1h are aligned in UTC (every exchange here is on a whole-hour offset, so
they are local hours too); 1d is the exchange's local calendar day (ASX: Australia/Sydney,
so a trading day is one bar, not two UTC halves; Binance: UTC). Bars are always computed
from whole buckets of trades and replace whole buckets, so re-running is exact.

Within a bucket, trades are ordered by timestamp, then source_sequence, then
platform_sequence, then message_id: open is the first, close the last. VWAP is
sum(price * quantity) / sum(quantity); ``notional`` keeps that numerator (each product
rounded to 8 decimal places) so coarser bars can be checked against finer ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import cast

import polars as pl
import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, In, LessThan
from pyiceberg.table import Table

from k2_resources.catalog.resource import ensure_tables
from k2_resources.catalog.tables import OHLCV, OHLCV_SCHEMA, TRADES
from k2_resources.errors import K2Error
from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader

INTERVALS: dict[str, str] = {"1m": "1m", "5m": "5m", "1h": "1h", "1d": "1d"}  # name -> polars duration
EXCHANGE_TIME_ZONES: dict[str, str] = {"ASX": "Australia/Sydney"}  # others: UTC
TRADE_COLUMNS = (
    "symbol",
    "exchange",
    "timestamp",
    "price",
    "quantity",
    "source_sequence",
    "platform_sequence",
    "message_id",
)


def ohlcv_table(catalog: Catalog) -> Table:
    """``market.ohlcv``, created with the other K2 tables if it does not exist yet."""
    try:
        return catalog.load_table(OHLCV.identifier)
    except NoSuchTableError:
        ensure_tables(catalog)
        return catalog.load_table(OHLCV.identifier)


def _bucket_start(interval: str) -> pl.Expr:
    if interval not in INTERVALS:
        raise K2Error(f"unknown interval {interval!r}; use one of {', '.join(INTERVALS)}")
    timestamp = pl.col("timestamp")
    if interval != "1d":
        return timestamp.dt.truncate(INTERVALS[interval])
    # A day is the exchange's local calendar day.
    local_days = [
        timestamp.dt.convert_time_zone(zone).dt.truncate("1d").dt.convert_time_zone("UTC")
        for zone in EXCHANGE_TIME_ZONES.values()
    ]
    expression = timestamp.dt.truncate("1d")
    for (exchange, _), local in zip(EXCHANGE_TIME_ZONES.items(), local_days):
        expression = pl.when(pl.col("exchange") == exchange).then(local).otherwise(expression)
    return expression


def _bucket_end(interval: str) -> pl.Expr:
    if interval != "1d":
        return pl.col("bucket_start").dt.offset_by(INTERVALS[interval])
    expression = pl.col("bucket_start").dt.offset_by("1d")
    for exchange, zone in EXCHANGE_TIME_ZONES.items():
        local_next = pl.col("bucket_start").dt.convert_time_zone(zone).dt.offset_by("1d").dt.convert_time_zone("UTC")
        expression = pl.when(pl.col("exchange") == exchange).then(local_next).otherwise(expression)
    return expression


def ohlcv_bars(
    trades: pl.DataFrame | pa.Table, intervals: Iterable[str] = INTERVALS, computed_at: datetime | None = None
) -> pl.DataFrame:
    """Bars of every interval for ``trades`` (columns at least TRADE_COLUMNS), in OHLCV's columns."""
    frame = trades if isinstance(trades, pl.DataFrame) else pl.from_arrow(trades)
    if not isinstance(frame, pl.DataFrame):
        raise TypeError("trades must be a table")
    frame = frame.select(
        "symbol",
        "exchange",
        "timestamp",
        pl.col("price").cast(pl.Decimal(18, 8)),
        pl.col("quantity").cast(pl.Decimal(18, 8)),
        *[
            pl.col(c) if c in frame.columns else pl.lit(None, dtype=pl.Int64).alias(c)
            for c in ("source_sequence", "platform_sequence")
        ],
        pl.col("message_id") if "message_id" in frame.columns else pl.lit("").alias("message_id"),
    ).sort("timestamp", "source_sequence", "platform_sequence", "message_id", nulls_last=True)
    computed_at = computed_at or datetime.now(UTC)
    bars = []
    for interval in intervals:
        grouped = (
            frame.with_columns(_bucket_start(interval).alias("bucket_start"))
            .group_by("symbol", "exchange", "bucket_start", maintain_order=True)
            .agg(
                pl.col("price").first().alias("open"),
                pl.col("price").max().alias("high"),
                pl.col("price").min().alias("low"),
                pl.col("price").last().alias("close"),
                pl.col("quantity").sum().cast(pl.Decimal(38, 8)).alias("volume"),
                (pl.col("price") * pl.col("quantity")).sum().cast(pl.Decimal(38, 8)).alias("notional"),
                pl.len().cast(pl.Int64).alias("trade_count"),
                pl.col("timestamp").first().alias("first_trade_at"),
                pl.col("timestamp").last().alias("last_trade_at"),
            )
        )
        bars.append(
            grouped.with_columns(
                pl.lit(interval).alias("interval"),
                _bucket_end(interval).alias("bucket_end"),
                pl.when(pl.col("volume") > 0)
                .then(pl.col("notional") / pl.col("volume"))
                .otherwise(pl.col("close").cast(pl.Decimal(38, 8)))
                .cast(pl.Decimal(18, 8))
                .alias("vwap"),
                pl.lit(computed_at).dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias("computed_at"),
            )
        )
    columns = [field.name for field in OHLCV_SCHEMA.fields]
    if not bars:
        return cast(pl.DataFrame, pl.from_arrow(OHLCV.arrow_schema().empty_table()))
    return pl.concat([b.select(columns) for b in bars]).sort("interval", "symbol", "bucket_start")


def to_ohlcv_arrow(bars: pl.DataFrame) -> pa.Table:
    return bars.to_arrow().cast(OHLCV.arrow_schema())


def replace_filter(
    exchange: str, start: datetime, end: datetime, symbols: Sequence[str] | None = None
) -> BooleanExpression:
    """The bars of ``exchange`` whose buckets start in [start, end) (optionally some symbols only)."""
    expression: BooleanExpression = And(
        EqualTo(term="exchange", value=exchange),
        And(
            GreaterThanOrEqual(term="bucket_start", value=start.isoformat()),
            LessThan(term="bucket_start", value=end.isoformat()),
        ),
    )
    if symbols:
        expression = And(expression, In(term="symbol", literals=tuple(symbols)))
    return expression


def replace_bars(
    table: Table,
    bars: pl.DataFrame,
    exchange: str,
    start: datetime,
    end: datetime,
    snapshot_properties: dict[str, str] | None = None,
) -> int | None:
    """Replace every bar of ``exchange`` with a bucket starting in [start, end) by ``bars``, in one commit."""
    outside = bars.filter(
        (pl.col("bucket_start") < start) | (pl.col("bucket_start") >= end) | (pl.col("exchange") != exchange)
    )
    if outside.height:
        raise K2Error(
            f"{outside.height} bars lie outside the replaced range {start}..{end} of {exchange}; "
            "widen the range to whole buckets"
        )
    table.overwrite(
        to_ohlcv_arrow(bars),
        overwrite_filter=replace_filter(exchange, start, end),
        snapshot_properties=snapshot_properties or {},
    )
    table.refresh()
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None


def bar_violations(bars: pl.DataFrame) -> dict[str, int]:
    """Counts of bars breaking high >= max(open, close) and low <= min(open, close)."""
    return {
        "high_below_open_or_close": bars.filter(
            (pl.col("high") < pl.col("open")) | (pl.col("high") < pl.col("close"))
        ).height,
        "low_above_open_or_close": bars.filter(
            (pl.col("low") > pl.col("open")) | (pl.col("low") > pl.col("close"))
        ).height,
    }


def volume_by_interval(bars: pl.DataFrame) -> dict[str, str]:
    """Total volume per interval (as strings of exact decimals), for the volume check."""
    totals = bars.group_by("interval").agg(pl.col("volume").sum()).sort("interval")
    return {row["interval"]: str(row["volume"]) for row in totals.iter_rows(named=True)}


def roll_up(minute_bars: pl.DataFrame, interval: str, computed_at: datetime | None = None) -> pl.DataFrame:
    """Bars of ``interval`` from complete 1m bars: the same numbers as computing them from the trades."""
    if interval == "1m":
        return minute_bars
    ordered = minute_bars.filter(pl.col("interval") == "1m").sort("symbol", "exchange", "bucket_start")
    computed_at = computed_at or datetime.now(UTC)
    grouped = (
        ordered.rename({"bucket_start": "minute"})
        .with_columns(pl.col("minute").alias("timestamp"))
        .with_columns(_bucket_start(interval).alias("bucket_start"))
        .group_by("symbol", "exchange", "bucket_start", maintain_order=True)
        .agg(
            pl.col("open").first(),
            pl.col("high").max(),
            pl.col("low").min(),
            pl.col("close").last(),
            pl.col("volume").sum().cast(pl.Decimal(38, 8)),
            pl.col("notional").sum().cast(pl.Decimal(38, 8)),
            pl.col("trade_count").sum().cast(pl.Int64),
            pl.col("first_trade_at").min(),
            pl.col("last_trade_at").max(),
        )
        .with_columns(
            pl.lit(interval).alias("interval"),
            _bucket_end(interval).alias("bucket_end"),
            pl.when(pl.col("volume") > 0)
            .then(pl.col("notional") / pl.col("volume"))
            .otherwise(pl.col("close").cast(pl.Decimal(38, 8)))
            .cast(pl.Decimal(18, 8))
            .alias("vwap"),
            pl.lit(computed_at).dt.convert_time_zone("UTC").dt.cast_time_unit("us").alias("computed_at"),
        )
    )
    return grouped.select([field.name for field in OHLCV_SCHEMA.fields])


def exchange_day_bounds(exchange: str, day: str | datetime) -> tuple[datetime, datetime]:
    """[start, end) in UTC of the exchange's local calendar day ``day`` (ISO date or a moment in it)."""
    from datetime import date, timedelta
    from zoneinfo import ZoneInfo

    zone = ZoneInfo(EXCHANGE_TIME_ZONES.get(exchange, "UTC"))
    if isinstance(day, datetime):
        local = day.astimezone(zone).date()
    else:
        local = date.fromisoformat(day)
    following = local + timedelta(days=1)
    start = datetime(local.year, local.month, local.day, tzinfo=zone)
    end = datetime(following.year, following.month, following.day, tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def empty_bars() -> pl.DataFrame:
    """No bars, in OHLCV's columns."""
    return cast(pl.DataFrame, pl.from_arrow(OHLCV.arrow_schema().empty_table()))


def empty_trades() -> pl.DataFrame:
    """No trades, in TRADE_COLUMNS."""
    return cast(pl.DataFrame, pl.from_arrow(TRADES.arrow_schema().empty_table())).select(TRADE_COLUMNS)


def stored_bars(ohlcv: Table, exchange: str, start: datetime, end: datetime) -> pl.DataFrame:
    """The bars of ``exchange`` in ``market.ohlcv`` whose buckets start in [start, end)."""
    rows = ohlcv.scan(
        row_filter=And(
            EqualTo(term="exchange", value=exchange),
            And(
                GreaterThanOrEqual(term="bucket_start", value=start.isoformat()),
                LessThan(term="bucket_start", value=end.isoformat()),
            ),
        )
    ).to_arrow()
    return cast(pl.DataFrame, pl.from_arrow(rows))


def read_trades(table: Table, snapshot_id: int | None, row_filter: RowFilter) -> pl.DataFrame:
    """The TRADE_COLUMNS of the trades matching ``row_filter`` in snapshot ``snapshot_id`` of market.trades."""
    reader = SnapshotReader()
    try:
        return cast(pl.DataFrame, pl.from_arrow(reader.read(table, snapshot_id, row_filter, columns=TRADE_COLUMNS)))
    finally:
        reader.close()
