"""The most recent trades of each exchange in ``market.trades``: the volume ranking's input.

Each exchange's window ends at its own newest trade (inclusive), so a historical source (the
bundled ASX days) and the live stream both have one; with a live stream that is the last hours.
The newest trade per exchange comes from the data files' column bounds, without reading data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import cast

import polars as pl
from pyiceberg.conversions import from_bytes
from pyiceberg.table import Table
from pyiceberg.types import PrimitiveType

from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader

_TIMESTAMP_COLUMN = "timestamp"
RANKED_COLUMNS = ("symbol", "exchange", "price", "quantity")


@dataclass(frozen=True)
class RecentTrades:
    """Trades of each exchange's last window, the windows (exchange -> [start, end)) and the
    snapshot they were read from (None: the table has no snapshot, and ``trades`` is empty)."""

    trades: pl.DataFrame
    windows: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)
    snapshot_id: int | None = None


def newest_per_exchange(table: Table, snapshot_id: int) -> dict[str, datetime]:
    """The newest trade time per exchange, from the data files' column bounds (no data read)."""
    timestamp_field = table.schema().find_field(_TIMESTAMP_COLUMN)
    exchange_positions = {
        spec_id: next((i for i, f in enumerate(spec.fields) if f.name == "exchange"), None)
        for spec_id, spec in table.specs().items()
    }
    newest: dict[str, datetime] = {}
    for task in table.scan(snapshot_id=snapshot_id).plan_files():
        data_file = task.file
        bound = (data_file.upper_bounds or {}).get(timestamp_field.field_id)
        position = exchange_positions.get(data_file.spec_id)
        exchange = data_file.partition[position] if position is not None else None
        if bound is None or exchange is None:  # no statistics or no exchange partition: read the file's column
            frame = pl.read_parquet(
                data_file.file_path.removeprefix("file://"), columns=["exchange", _TIMESTAMP_COLUMN]
            )
            for row in frame.group_by("exchange").agg(pl.col(_TIMESTAMP_COLUMN).max()).iter_rows(named=True):
                value = row[_TIMESTAMP_COLUMN].replace(tzinfo=UTC)
                newest[row["exchange"]] = max(newest.get(row["exchange"], value), value)
            continue
        micros = from_bytes(cast(PrimitiveType, timestamp_field.field_type), bound)  # a timestamp column
        value = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(micros))
        newest[exchange] = max(newest.get(exchange, value), value)
    return newest


def recent_trades(table: Table, window: timedelta, columns: tuple[str, ...] = RANKED_COLUMNS) -> RecentTrades:
    """``columns`` of each exchange's trades over its last ``window`` of trading, from the current
    snapshot (an empty frame without columns when no exchange has a trade)."""
    snapshot = table.current_snapshot()
    if snapshot is None:
        return RecentTrades(pl.DataFrame())
    windows = {
        exchange: (end - window, end + timedelta(microseconds=1))
        for exchange, end in newest_per_exchange(table, snapshot.snapshot_id).items()
    }
    reader = SnapshotReader()
    try:
        frames = [
            reader.read_frame(table, snapshot.snapshot_id, RowFilter(None, start, end, exchange), columns=list(columns))
            for exchange, (start, end) in sorted(windows.items())
        ]
    finally:
        reader.close()
    return RecentTrades(pl.concat(frames) if frames else pl.DataFrame(), windows, snapshot.snapshot_id)
