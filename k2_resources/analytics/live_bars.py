"""Live bars: 1-minute OHLCV bars of the last hours of trades, including trades still in Kafka.

The trades come through :class:`~k2_resources.trades.hybrid.HybridQueryResource`, so the bars
cover the Iceberg snapshot and the Kafka tail above its committed offsets, each trade once.

The window is anchored on the data, not on the wall clock: it ends at the end of the minute of
the newest trade (in Iceberg or in Kafka) and spans ``hours`` before that. A live feed's newest
trade is seconds old, so that is "the last two hours"; a recording played yesterday still gets
its last two hours of bars instead of none. And a re-run with nothing new reads the same window
and the same trades, so it computes the same bars; then nothing is written at all. The newest
minute's bar is still filling while the stream runs.

The bars live in ``market.live_bars`` (the columns of ``market.ohlcv``, interval ``1m``), replaced
whole in one commit whose snapshot summary records the window and how many trades came from
Iceberg and from Kafka. Snapshots older than an hour are expired as it goes (the newest ten are
always kept): the table is rewritten every few minutes and its history has no other use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import polars as pl
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchTableError
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.table import Table

from k2_resources.analytics.ohlcv import TRADE_COLUMNS, bar_violations, ohlcv_bars, to_ohlcv_arrow
from k2_resources.catalog.resource import ensure_tables
from k2_resources.catalog.tables import LIVE_BARS, OHLCV
from k2_resources.errors import K2Error
from k2_resources.operations.maintenance import expire_snapshots
from k2_resources.trades.hybrid import HybridQueryResource, QueryStats

_BAR_KEY = ["symbol", "exchange", "bucket_start"]
SNAPSHOT_RETENTION = timedelta(hours=1)
SNAPSHOTS_KEPT = 10


@dataclass
class LiveBars:
    """The bars of one window and the trades they were built from."""

    bars: pl.DataFrame  # 1m bars in market.ohlcv's columns
    trades: pl.DataFrame  # the window's trades (TRADE_COLUMNS)
    start: datetime | None  # None: no trades at all
    end: datetime | None
    stats: QueryStats = field(default_factory=QueryStats)


def live_bars_table(catalog: Catalog) -> Table:
    """``market.live_bars``, created with the other K2 tables if it does not exist yet."""
    try:
        return catalog.load_table(LIVE_BARS.identifier)
    except NoSuchTableError:
        ensure_tables(catalog)
        return catalog.load_table(LIVE_BARS.identifier)


def compute_live_bars(
    hybrid: HybridQueryResource,
    hours: float = 2.0,
    exchange: str = "BINANCE",
    symbols: Sequence[str] | None = None,
    allow_partial: bool = False,
    computed_at: datetime | None = None,
) -> LiveBars:
    """1m bars of ``exchange``'s trades in the ``hours`` up to the end of the newest trade's minute.

    Two hybrid reads: one from the newest committed trade minus ``hours`` to the end of the log finds
    the newest trade (the anchor); the second reads exactly the window, and its statistics say how
    many trades came from Iceberg and from Kafka. The tail is decoded once (the hybrid resource
    caches it), and a batch committing in between moves rows from the Kafka part to the Iceberg
    part without changing the window's trades.
    """
    if hours <= 0:
        raise K2Error(f"hours={hours} must be positive")
    span = timedelta(hours=hours)
    chosen = list(symbols) if symbols else None
    table = hybrid.iceberg.trades()
    snapshot = table.current_snapshot()
    newest_committed = hybrid.newest_committed_trade(table, snapshot.snapshot_id if snapshot else None, (exchange,))
    probe_start = newest_committed - span - timedelta(minutes=1) if newest_committed else None
    probe = hybrid.trades(chosen, probe_start, None, exchange=exchange, allow_partial=allow_partial)
    if probe.height == 0:
        empty = probe.select(TRADE_COLUMNS)
        return LiveBars(
            ohlcv_bars(empty, intervals=["1m"], computed_at=computed_at),
            empty,
            None,
            None,
            hybrid.last_stats or QueryStats(),
        )
    newest = cast(datetime, probe["timestamp"].max())
    end = newest.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - span
    trades = hybrid.trades(chosen, start, end, exchange=exchange, allow_partial=allow_partial)
    stats = hybrid.last_stats or QueryStats()
    trades = trades.select(TRADE_COLUMNS)
    return LiveBars(ohlcv_bars(trades, intervals=["1m"], computed_at=computed_at), trades, start, end, stats)


def _comparable(bars: pl.DataFrame) -> pl.DataFrame:
    """Bars in market.live_bars' exact types, without computed_at, in key order."""
    exact = cast(
        pl.DataFrame, pl.from_arrow(to_ohlcv_arrow(bars) if bars.height else OHLCV.arrow_schema().empty_table())
    )
    return exact.drop("computed_at").sort(_BAR_KEY)


def stored_live_bars(table: Table) -> pl.DataFrame:
    """Every bar in ``market.live_bars`` (current snapshot), ordered by symbol and minute."""
    table.refresh()
    if table.current_snapshot() is None:
        return cast(pl.DataFrame, pl.from_arrow(OHLCV.arrow_schema().empty_table()))
    return cast(pl.DataFrame, pl.from_arrow(table.scan().to_arrow())).sort(_BAR_KEY)


def replace_live_bars(
    table: Table, bars: pl.DataFrame, snapshot_properties: dict[str, str] | None = None
) -> tuple[int | None, bool]:
    """Replace every bar of the table by ``bars`` in one commit, unless they are the same bars already
    (computed_at aside): then nothing is written. Returns (current snapshot id, written)."""
    stored = stored_live_bars(table)
    if _comparable(stored).equals(_comparable(bars)):
        snapshot = table.current_snapshot()
        return (snapshot.snapshot_id if snapshot else None), False
    if bars.height and table.current_snapshot() is None:
        table.append(to_ohlcv_arrow(bars.sort(_BAR_KEY)), snapshot_properties=snapshot_properties or {})
    elif bars.height:
        table.overwrite(
            to_ohlcv_arrow(bars.sort(_BAR_KEY)),
            overwrite_filter=AlwaysTrue(),
            snapshot_properties=snapshot_properties or {},
        )
    else:
        table.delete(AlwaysTrue(), snapshot_properties=snapshot_properties or {})
    table.refresh()
    expire_snapshots(table, older_than=datetime.now(UTC) - SNAPSHOT_RETENTION, retain_last=SNAPSHOTS_KEPT)
    snapshot = table.current_snapshot()
    return (snapshot.snapshot_id if snapshot else None), True


def volume_mismatches(bars: pl.DataFrame, trades: pl.DataFrame) -> dict[str, str]:
    """Per symbol, where the bars' volume or trade count differs from the trades' (empty: none does)."""
    from_bars = {
        row["symbol"]: row
        for row in bars.group_by("symbol")
        .agg(pl.col("volume").sum(), pl.col("trade_count").sum())
        .iter_rows(named=True)
    }
    from_trades = {
        row["symbol"]: row
        for row in trades.group_by("symbol")
        .agg(pl.col("quantity").sum().alias("volume"), pl.len().alias("trade_count"))
        .iter_rows(named=True)
    }
    mismatches: dict[str, str] = {}
    for symbol in sorted(set(from_bars) | set(from_trades)):
        got, want = from_bars.get(symbol), from_trades.get(symbol)
        got_volume, want_volume = (got or {}).get("volume", 0), (want or {}).get("volume", 0)
        got_count, want_count = (got or {}).get("trade_count", 0), (want or {}).get("trade_count", 0)
        if got_volume != want_volume or got_count != want_count:
            mismatches[symbol] = (
                f"bars: volume {got_volume} in {got_count} trades; "
                f"hybrid trades: volume {want_volume} in {want_count} trades"
            )
    return mismatches


__all__ = [
    "LiveBars",
    "bar_violations",
    "compute_live_bars",
    "live_bars_table",
    "replace_live_bars",
    "stored_live_bars",
    "volume_mismatches",
]
