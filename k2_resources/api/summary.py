"""``/v1/symbols``' statistics kept incrementally: one summary per immutable data file.

A snapshot's statistics per (symbol, exchange) (first trade, last trade, trade count) are the
sums over its live data files' summaries. A data file never changes, so its summary (three
columns read once) is kept by path, and a new snapshot costs its plan plus the files it added,
never a scan of the table. A snapshot with delete files (another writer's merge-on-read) returns
None and the caller scans it with DuckDB, which applies them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import polars as pl
from pyiceberg.table import Table

from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader, object_store_options

MAX_FILES_KEPT = 100_000
EMPTY_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "symbol": pl.String,
    "exchange": pl.String,
    "first_trade": pl.Datetime("us", "UTC"),
    "last_trade": pl.Datetime("us", "UTC"),
    "trade_count": pl.Int64,
}


class SymbolSummary:
    """Per data file (symbol, exchange) -> first_trade, last_trade, trade_count; thread-safe."""

    def __init__(self, reader: SnapshotReader) -> None:
        self.reader = reader
        self._files: OrderedDict[str, pl.DataFrame] = OrderedDict()
        self._lock = threading.Lock()

    def _file_summary(self, table: Table, path: str) -> pl.DataFrame:
        with self._lock:
            cached = self._files.get(path)
        if cached is not None:
            return cached
        scan = pl.scan_parquet([path], hive_partitioning=False, storage_options=object_store_options(table, [path]))
        summary = (
            scan.group_by("symbol", "exchange")
            .agg(
                pl.col("timestamp").min().alias("first_trade"),
                pl.col("timestamp").max().alias("last_trade"),
                pl.len().cast(pl.Int64).alias("trade_count"),
            )
            .collect()
        )
        with self._lock:
            self._files[path] = summary
            while len(self._files) > MAX_FILES_KEPT:
                self._files.popitem(last=False)
        return summary

    def statistics(self, table: Table, snapshot_id: int, exchange: str | None) -> pl.DataFrame | None:
        """The snapshot's statistics ordered by (exchange, symbol); None when it has delete files."""
        files = self.reader.planned_files(table, snapshot_id, RowFilter(None, None, None, exchange))
        if files is None:
            return None
        parts = [self._file_summary(table, path) for path in files]
        if not parts:
            return pl.DataFrame(schema=EMPTY_SCHEMA)
        frame = pl.concat(parts, how="vertical_relaxed")
        if exchange is not None:
            frame = frame.filter(pl.col("exchange") == exchange)
        return (
            frame.group_by("symbol", "exchange")
            .agg(pl.col("first_trade").min(), pl.col("last_trade").max(), pl.col("trade_count").sum())
            .sort("exchange", "symbol")
        )
