"""TimeOrderedReader: a window of trades from Iceberg in time order, as fast as possible or paced.

The window is read from ONE pinned snapshot in consecutive time slices, so reading a month
holds one slice in memory at a time and never sees a half-written batch. Within the window
trades come in timestamp order; ties are broken by source_sequence, then platform_sequence,
then message_id, so two reads of the same window are identical (what Kafka replays rely on).

Pacing: with ``speed=s``, a trade that happened ``d`` seconds after the first one is yielded
``d / s`` seconds after the read started (``speed=60``: an hour in a minute); ``speed=None``
yields as fast as the reader goes. The clock and sleep are injectable, so tests pace a read
without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import polars as pl

from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader

ORDER = ["timestamp", "source_sequence", "platform_sequence", "message_id"]


@dataclass
class ReadProgress:
    """Where a read is: rows yielded, slices read, the last trade time, the snapshot read."""

    snapshot_id: int | None = None
    rows: int = 0
    slices: int = 0
    last_timestamp: datetime | None = None
    slept_seconds: float = 0.0


class TimeOrderedReader:
    """Reads ``market.trades`` for symbols and a window, in time order, in bounded memory."""

    def __init__(
        self,
        iceberg: IcebergResource | None = None,
        slice_length: timedelta = timedelta(minutes=30),
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if slice_length <= timedelta(0):
            raise K2Error(f"slice_length {slice_length} must be positive")
        self.iceberg = iceberg or IcebergResource()
        self.slice_length = slice_length
        self.clock = clock
        self.sleep = sleep
        self.progress = ReadProgress()

    def batches(
        self, symbols: str | Sequence[str] | None, start: datetime, end: datetime, exchange: str | None = None
    ) -> Iterator[pl.DataFrame]:
        """The window's trades as ordered DataFrames, one time slice at a time (empty slices skipped)."""
        if start.tzinfo is None or end.tzinfo is None:
            raise K2Error("start and end need a time zone, e.g. datetime(..., tzinfo=timezone.utc)")
        if end <= start:
            raise K2Error(f"end {end.isoformat()} is not after start {start.isoformat()}; swap them")
        chosen = None if symbols is None else ((symbols,) if isinstance(symbols, str) else tuple(symbols))
        table = self.iceberg.trades()
        snapshot = table.current_snapshot()
        self.progress = ReadProgress(snapshot_id=snapshot.snapshot_id if snapshot else None)
        if snapshot is None:
            return
        reader = SnapshotReader()
        try:
            lower = start
            while lower < end:
                upper = min(lower + self.slice_length, end)
                frame = reader.read_frame(table, snapshot.snapshot_id, RowFilter(chosen, lower, upper, exchange))
                self.progress.slices += 1
                lower = upper
                if frame.height:
                    yield frame.sort(ORDER, nulls_last=True)
        finally:
            reader.close()

    def records(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime,
        end: datetime,
        speed: float | None = None,
        exchange: str | None = None,
    ) -> Iterator[dict]:
        """Each trade of the window as a V2 record dict, in order, paced by ``speed`` (None: no pacing)."""
        if speed is not None and speed <= 0:
            raise K2Error(f"speed={speed} must be positive (or None for as fast as possible)")
        started_at: float | None = None
        first: datetime | None = None
        for frame in self.batches(symbols, start, end, exchange):
            for record in frame.iter_rows(named=True):
                if record.get("trade_conditions") is None:
                    record["trade_conditions"] = []  # the Avro contract has an array, never null
                if record.get("vendor_data") is not None and not isinstance(record["vendor_data"], dict):
                    record["vendor_data"] = {item["key"]: item["value"] for item in record["vendor_data"]}
                if speed is not None:
                    if first is None:
                        first, started_at = record["timestamp"], self.clock()
                    due = started_at + (record["timestamp"] - first).total_seconds() / speed
                    wait = due - self.clock()
                    if wait > 0:
                        self.sleep(wait)
                        self.progress.slept_seconds += wait
                self.progress.rows += 1
                self.progress.last_timestamp = record["timestamp"]
                yield record
