"""Binance OHLCV bars kept up to date as micro-batches land, recomputing only what changed.

An update reads what was appended to market.trades since the snapshot the previous update saw,
recomputes the 1m bars of the touched minutes from the trades, rolls the 5m, 1h and 1d bars
of the touched days up from the day's 1m bars, and replaces those days' bars in one commit
each: whole buckets, so the bars stay exact however batches are cut. Without a previous
snapshot (or when it has expired) every day with Binance trades is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import cast

import polars as pl
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.analytics.ohlcv import (
    INTERVALS,
    empty_bars,
    empty_trades,
    ohlcv_table,
    read_trades,
    replace_bars,
    roll_up,
    stored_bars,
)
from k2_resources.catalog.resource import IcebergResource
from k2_resources.trades.iceberg_read import RowFilter

EXCHANGE = "BINANCE"
NO_NEW_TRADES = "no new trades"


@dataclass(frozen=True)
class BinanceBarsReport:
    """What one update did, with the stored bars and the trades of the recomputed days (for the checks)."""

    source_snapshot_id: int | None  # the market.trades snapshot the bars now reflect
    previous_snapshot_id: int | None  # the one the previous update saw
    days: list[datetime]  # UTC starts of the days recomputed
    bars_written: int
    how: str  # how the days were found, or NO_NEW_TRADES
    stored: pl.DataFrame = field(default_factory=empty_bars)
    trades: pl.DataFrame = field(default_factory=empty_trades)

    @property
    def nothing_new(self) -> bool:
        """market.trades has no snapshot after the previous update's: nothing was read or written."""
        return self.how == NO_NEW_TRADES


def touched_days(table: Table, last: int | None, current: int) -> tuple[list[datetime], str]:
    """UTC day starts whose Binance trades changed since snapshot ``last``, and how that was found."""
    binance = EqualTo(term="exchange", value=EXCHANGE)
    if last is not None and table.snapshot_by_id(last) is not None:
        appended = table.incremental_append_scan(
            from_snapshot_id_exclusive=last,
            to_snapshot_id_inclusive=current,
            row_filter=binance,
            selected_fields=("timestamp",),
        ).to_arrow()
        how = f"appended since snapshot {last}"
    else:
        appended = table.scan(row_filter=binance, selected_fields=("timestamp",), snapshot_id=current).to_arrow()
        how = "full recompute (no earlier run, or its snapshot expired)"
    if appended.num_rows == 0:
        return [], how
    days = cast(pl.DataFrame, pl.from_arrow(appended)).select(pl.col("timestamp").dt.truncate("1d").unique().sort())[
        "timestamp"
    ]
    return days.to_list(), how


def update_binance_bars(
    iceberg: IcebergResource, last_snapshot_id: int | None, engine: AnalyticsEngineResource | None = None
) -> BinanceBarsReport:
    """Bring the Binance bars in market.ohlcv up to market.trades' current snapshot.

    ``last_snapshot_id`` is the source snapshot of the previous update (None: recompute all);
    ``engine`` computes the 1m bars from the trades (default: in process).
    """
    engine = engine or AnalyticsEngineResource(engine="polars")
    last = last_snapshot_id
    table = iceberg.trades()
    snapshot = table.current_snapshot()
    if snapshot is None or snapshot.snapshot_id == last:
        return BinanceBarsReport(
            source_snapshot_id=last, previous_snapshot_id=last, days=[], bars_written=0, how=NO_NEW_TRADES
        )
    current = snapshot.snapshot_id
    days, how = touched_days(table, last, current)
    ohlcv = ohlcv_table(iceberg.catalog())
    all_stored, all_trades, bars_written = [], [], 0
    for day_start in days:
        day_end = day_start + timedelta(days=1)
        appended = (
            table.incremental_append_scan(
                from_snapshot_id_exclusive=last,
                to_snapshot_id_inclusive=current,
                row_filter=And(
                    EqualTo(term="exchange", value=EXCHANGE),
                    And(
                        GreaterThanOrEqual(term="timestamp", value=day_start.isoformat()),
                        LessThan(term="timestamp", value=day_end.isoformat()),
                    ),
                ),
                selected_fields=("timestamp",),
            ).to_arrow()
            if last is not None and table.snapshot_by_id(last)
            else None
        )
        if appended is not None and appended.num_rows:
            stamps = cast(pl.DataFrame, pl.from_arrow(appended))["timestamp"]
            first_minute = cast(datetime, stamps.min()).replace(second=0, microsecond=0)
            end_minute = cast(datetime, stamps.max()).replace(second=0, microsecond=0) + timedelta(minutes=1)
        else:
            first_minute, end_minute = day_start, day_end
        fresh = engine.ohlcv_bars(
            iceberg, table, current, RowFilter(None, first_minute, end_minute, EXCHANGE), intervals=["1m"]
        )
        kept = stored_bars(ohlcv, EXCHANGE, day_start, day_end).filter(
            (pl.col("interval") == "1m")
            & ((pl.col("bucket_start") < first_minute) | (pl.col("bucket_start") >= end_minute))
        )
        minutes = pl.concat([kept, fresh]).sort("symbol", "bucket_start")
        bars = pl.concat([minutes] + [roll_up(minutes, interval) for interval in INTERVALS if interval != "1m"])
        replace_bars(
            ohlcv,
            bars,
            EXCHANGE,
            day_start,
            day_end,
            snapshot_properties={
                "k2.ohlcv.source-snapshot": str(current),
                "k2.ohlcv.binance-day": day_start.date().isoformat(),
            },
        )
        bars_written += bars.height
        all_stored.append(stored_bars(ohlcv, EXCHANGE, day_start, day_end))
        all_trades.append(read_trades(table, current, RowFilter(None, day_start, day_end, EXCHANGE)))
    return BinanceBarsReport(
        source_snapshot_id=current,
        previous_snapshot_id=last,
        days=days,
        bars_written=bars_written,
        how=how,
        stored=pl.concat(all_stored) if all_stored else empty_bars(),
        trades=pl.concat(all_trades) if all_trades else empty_trades(),
    )
