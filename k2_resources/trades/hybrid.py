"""HybridQueryResource: trades from Iceberg and from the Kafka tail, merged exactly.

One query loads ``market.trades`` ONCE and takes from that same metadata both the snapshot it
reads and the committed Kafka offsets (the table property written in the same commit as the
snapshot, see :mod:`k2_resources.trades.offsets`). The Iceberg part is the snapshot's rows;
the Kafka part is, per partition, the offsets from ``committed[p]`` to the log end captured at
query start. A micro-batch that commits while the query runs changes neither: its rows are
not in the pinned snapshot and are in the Kafka range, so nothing is counted twice and
nothing is missed. The window bounds the Kafka part from below through offsets_for_times
(with a slack for producer clocks), rows are filtered by symbol and window, merged,
deduplicated by message_id and ordered by timestamp, then platform_sequence.

``as_of`` (a snapshot id or a time) reads Iceberg time travel only: what the table held then.

Works without Dagster: ``HybridQueryResource().recent_trades("BTCUSDT", minutes=15)`` reads
K2_HOME and K2_KAFKA_BOOTSTRAP from the environment.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

import polars as pl
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr
from pyiceberg.table import Table

from k2_resources.errors import K2Error
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.tables import QUOTES, TRADES
from k2_resources.topics import BINANCE_TRADES_TOPIC
from k2_resources.trades.iceberg_read import DEFAULT_READ_PATH, RowFilter, ScanStats, SnapshotReader
from k2_resources.trades.kafka_tail import KafkaTail, TailStats
from k2_resources.trades.offsets import PendingRange, committed_offsets, pending_ranges, snapshot_committed_offsets

_ORDER = [("timestamp", "ascending"), ("platform_sequence", "ascending"), ("source_sequence", "ascending"),
          ("message_id", "ascending")]


@dataclass
class QueryStats:
    """What the last query read: the snapshot, the committed offsets, the Kafka ranges, row counts."""

    snapshot_id: int | None = None
    committed: dict[str, dict[int, int]] = field(default_factory=dict)
    pending: dict[str, list[PendingRange]] = field(default_factory=dict)  # below committed, rows not in the table yet
    iceberg: ScanStats = field(default_factory=ScanStats)
    kafka: TailStats = field(default_factory=TailStats)
    iceberg_rows: int = 0
    kafka_rows: int = 0
    duplicates_dropped: int = 0


def _utc(moment: datetime | None, name: str) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise K2Error(f"{name}={moment.isoformat()} has no time zone; pass an aware datetime, "
                      "e.g. datetime(..., tzinfo=timezone.utc)")
    return moment.astimezone(timezone.utc)


def _symbols(symbols: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if symbols is None:
        return None
    chosen = (symbols,) if isinstance(symbols, str) else tuple(symbols)
    if not chosen:
        raise K2Error("symbols is empty; pass one symbol, a list of symbols, or None for all")
    return chosen


def merge_trades(parts: Sequence[pa.Table | pl.DataFrame], stats: QueryStats | None = None) -> pl.DataFrame:
    """Concatenate trade parts, keep each message_id's first row, order by timestamp then sequences."""
    frames = [part if isinstance(part, pl.DataFrame) else pl.from_arrow(part) for part in parts]
    frames = [frame for frame in frames if frame.height] or frames[:1]
    merged = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
    if merged.height == 0:
        return merged
    unique = merged
    if merged["message_id"].n_unique() != merged.height:  # cheap test first; duplicates are rare
        unique = merged.filter(pl.col("message_id").is_first_distinct())
    if stats is not None:
        stats.duplicates_dropped = merged.height - unique.height
    return unique.sort([name for name, _ in _ORDER], nulls_last=True)


def to_trades_arrow(frame: pl.DataFrame) -> pa.Table:
    """A merged result in market.trades' exact Arrow schema."""
    return frame.to_arrow().cast(TRADES.arrow_schema())


class HybridQueryResource(ConfigurableResource):
    """Trades from Iceberg plus the Kafka tail not yet committed, exactly once; quotes from Iceberg."""

    kafka: KafkaResource = Field(default_factory=KafkaResource)
    iceberg: IcebergResource = Field(default_factory=IcebergResource)
    topics: list[str] = Field(default_factory=lambda: [BINANCE_TRADES_TOPIC],
                              description="Kafka topics of trade V2 records whose tails are read")
    read_path: str = Field(default=DEFAULT_READ_PATH,
                           description="Iceberg read path: polars (default, measured fastest), planned, duckdb, pyiceberg")
    producer_clock_slack_seconds: float = Field(
        default=300.0,
        description="how far a Kafka message timestamp may lag the trade's time; widens the offsets_for_times bound",
    )
    max_cached_tail_rows: int = Field(default=2_000_000, description="decoded tail rows kept per partition")

    _reader: SnapshotReader | None = PrivateAttr(default=None)
    _tail: KafkaTail | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # Called after the table metadata was read and before Kafka is: tests commit a batch here.
    _after_metadata_read: Callable[[], None] | None = PrivateAttr(default=None)
    _last_stats: QueryStats | None = PrivateAttr(default=None)

    @property
    def last_stats(self) -> QueryStats | None:
        """What the last trades() call read (snapshot, committed offsets, Kafka ranges, rows)."""
        return self._last_stats

    def _snapshot_reader(self) -> SnapshotReader:
        with self._lock:
            if self._reader is None:
                self._reader = SnapshotReader(read_path=self.read_path)  # type: ignore[arg-type]
            return self._reader

    def kafka_tail(self) -> KafkaTail:
        with self._lock:
            if self._tail is None:
                self._tail = KafkaTail(self.kafka, max_cached_rows=self.max_cached_tail_rows)
            return self._tail

    # ---------------------------------------------------------------------------------------
    # Trades
    # ---------------------------------------------------------------------------------------

    def trades(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
        arrow: bool = False,
    ) -> pl.DataFrame | pa.Table:
        """Trades of ``symbols`` (None: all) with start <= timestamp < end, ordered by timestamp.

        ``as_of``: a snapshot id or an aware datetime; reads that Iceberg snapshot only.
        ``arrow=True`` returns a pyarrow Table in market.trades' schema instead of polars.
        """
        row_filter = RowFilter(_symbols(symbols), _utc(start, "start"), _utc(end, "end"), exchange)
        if row_filter.start and row_filter.end and row_filter.end <= row_filter.start:
            raise K2Error(f"end {row_filter.end.isoformat()} is not after start {row_filter.start.isoformat()}; "
                          "swap them")
        stats = QueryStats()
        table = self.iceberg.trades()  # the ONE metadata read of this query
        if as_of is not None:
            snapshot = self._snapshot_as_of(table, as_of)
            stats.snapshot_id = snapshot.snapshot_id
            stats.committed = {t: snapshot_committed_offsets(table, snapshot, t) for t in self.topics}
            result = self._snapshot_reader().read_frame(table, snapshot.snapshot_id, row_filter, stats=stats.iceberg)
            stats.iceberg_rows = result.height
            merged = merge_trades([result], stats)
        else:
            snapshot = table.current_snapshot()
            stats.snapshot_id = snapshot.snapshot_id if snapshot else None
            stats.committed = {topic: committed_offsets(table, topic) for topic in self.topics}
            stats.pending = {topic: pending_ranges(table, topic) for topic in self.topics}
            if self._after_metadata_read is not None:
                self._after_metadata_read()
            iceberg_part = self._snapshot_reader().read_frame(table, stats.snapshot_id, row_filter,
                                                              stats=stats.iceberg)
            kafka_part = self._kafka_part(row_filter, stats)
            stats.iceberg_rows, stats.kafka_rows = iceberg_part.height, kafka_part.height
            merged = merge_trades([iceberg_part, kafka_part], stats)
        self._last_stats = stats
        return to_trades_arrow(merged) if arrow else merged

    def recent_trades(self, symbol: str, minutes: float = 15, now: datetime | None = None,
                      arrow: bool = False) -> pl.DataFrame | pa.Table:
        """The trades of ``symbol`` in the last ``minutes`` before ``now`` (default: the wall clock)."""
        if minutes <= 0:
            raise K2Error(f"minutes={minutes} must be positive")
        end = _utc(now, "now") or datetime.now(timezone.utc)
        # Inclusive of ``now``: the window ends one microsecond after it.
        return self.trades(symbol, end - timedelta(minutes=minutes), end + timedelta(microseconds=1), arrow=arrow)

    def _snapshot_as_of(self, table: Table, as_of: int | datetime):
        if isinstance(as_of, datetime):
            moment = _utc(as_of, "as_of")
            snapshot = table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
            if snapshot is None:
                raise K2Error(f"{table.name()} has no snapshot at or before {moment.isoformat()}; "
                              "pick a later time (see the table's snapshots with `k2 query sql`)")
            return snapshot
        snapshot = table.snapshot_by_id(int(as_of))
        if snapshot is None:
            raise K2Error(f"{table.name()} has no snapshot {as_of}; it may have expired; "
                          "list the snapshots with table.snapshots() or pass a time instead")
        return snapshot

    def _kafka_part(self, row_filter: RowFilter, stats: QueryStats) -> pl.DataFrame:
        tail = self.kafka_tail()
        frames: list[pl.DataFrame] = []
        for topic in self.topics:
            committed = stats.committed.get(topic, {})
            partitions = sorted(set(tail.partitions(topic)) | set(committed))
            if not partitions:
                continue
            ends = tail.end_offsets(topic, partitions)
            for partition, done in committed.items():
                if ends.get(partition, 0) < done:
                    raise K2Error(
                        f"{topic}[{partition}] ends at offset {ends.get(partition, 0)} but market.trades has "
                        f"committed up to {done}: the topic was recreated; set a new baseline with "
                        "`k2 offsets reset` before querying the tail"
                    )
            lower = {p: committed.get(p, 0) for p in partitions}
            # The time bound only saves fetching: skip its broker round trip when the decoded tail
            # already covers every offset from the committed ones to the end.
            if row_filter.start is not None and not tail.covers(topic, {p: (lower[p], ends.get(p, 0)) for p in partitions}):
                bound_ms = int((row_filter.start.timestamp() - self.producer_clock_slack_seconds) * 1000)
                by_time = tail.offsets_for_time(topic, partitions, max(bound_ms, 0))
                lower = {p: max(lower[p], ends[p] if by_time.get(p) is None else by_time[p]) for p in partitions}
            ranges = {p: (lower[p], ends.get(p, 0)) for p in partitions}
            tail.forget_below(topic, committed)
            frames.append(tail.read(topic, ranges, stats.kafka, predicate=row_filter.polars()))
            frames.append(_filter(_pending_rows(self.kafka, stats.pending.get(topic, []), row_filter), row_filter))
        if not frames:
            return pl.from_arrow(TRADES.arrow_schema().empty_table())
        return pl.concat(frames)

    # ---------------------------------------------------------------------------------------
    # Quotes
    # ---------------------------------------------------------------------------------------

    def quotes(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
        arrow: bool = False,
    ) -> pl.DataFrame | pa.Table:
        """Quotes from ``market.quotes`` (Iceberg only: there is no quote topic yet), ordered by timestamp."""
        row_filter = RowFilter(_symbols(symbols), _utc(start, "start"), _utc(end, "end"), exchange)
        table = self.iceberg.quotes()
        snapshot = self._snapshot_as_of(table, as_of) if as_of is not None else table.current_snapshot()
        rows = self._snapshot_reader().read(table, snapshot.snapshot_id if snapshot else None, row_filter)
        schema = QUOTES.arrow_schema()
        rows = (rows.cast(schema) if rows.schema != schema else rows).sort_by(
            [("timestamp", "ascending"), ("source_sequence", "ascending"), ("message_id", "ascending")])
        return rows if arrow else pl.from_arrow(rows)

    def close(self) -> None:
        """Close the cached Kafka consumer and DuckDB connections."""
        if self._tail is not None:
            self._tail.close()
        if self._reader is not None:
            self._reader.close()


def _filter(rows: pl.DataFrame, row_filter: RowFilter) -> pl.DataFrame:
    conditions = []
    if row_filter.symbols is not None:
        conditions.append(pl.col("symbol").is_in(list(row_filter.symbols)))
    if row_filter.exchange is not None:
        conditions.append(pl.col("exchange") == row_filter.exchange)
    if row_filter.start is not None:
        conditions.append(pl.col("timestamp") >= row_filter.start)
    if row_filter.end is not None:
        conditions.append(pl.col("timestamp") < row_filter.end)
    return rows.filter(*conditions) if conditions else rows


def _pending_rows(kafka: KafkaResource, pending: list[PendingRange], row_filter: RowFilter) -> pl.DataFrame:
    """Rows of load-shed ranges (below the committed offsets, not in the table yet) read from Kafka:
    every row of a spilled range, the deferred symbols' rows of a deferred range."""
    from k2_resources.iceberg import to_arrow
    from k2_resources.trades.microbatch import read_range

    records: list[dict] = []
    for entry in pending:
        if row_filter.symbols is not None and entry.kind == "deferred" and not set(entry.symbols) & set(row_filter.symbols):
            continue  # none of the wanted symbols is missing from this range
        records += [r for r in read_range(kafka, entry.range).records if entry.is_missing(r["symbol"])]
    return pl.from_arrow(to_arrow(records, TRADES))
