"""HybridQueryResource: trades from Iceberg and from the Kafka tail, merged exactly.

One query loads ``market.trades`` ONCE and takes from that same metadata both the snapshot it
reads and the committed Kafka offsets (the table property written in the same commit as the
snapshot, see :mod:`k2_resources.sink.offsets`). The Iceberg part is the snapshot's rows;
the Kafka part is, per partition, the offsets from ``committed[p]`` to the log end captured at
query start. A micro-batch that commits while the query runs changes neither: its rows are
not in the pinned snapshot and are in the Kafka range, so nothing is counted twice and
nothing is missed. The window bounds the Kafka part from below through offsets_for_times
(with a slack for producer clocks), rows are filtered by symbol and window, merged,
deduplicated by message_id and ordered by timestamp, then platform_sequence.

What the first query of a new process costs (``bench-results/cli.json``): the metadata is read
without pyiceberg's SQL catalog when the catalog is the default SQLite one
(:func:`~k2_resources.trades.iceberg_read.load_for_read`), the Iceberg part is read in a thread
while Kafka answers, and with the sink running the Kafka part is only the seconds it has not
committed yet (a few hundred messages), since it starts at max(committed, offset for the window).

``as_of`` (a snapshot id or a time) reads Iceberg time travel only: what the table held then.

What is answered without Kafka (so a query works while Kafka is down)
    A topic's tail is not read when the query cannot match anything in it:

    * the query asks for an exchange the topic does not carry (``topic_exchanges``: the Binance
      topic carries BINANCE only; ASX has no topic at all), or
    * the window ends at least ``max_trade_lateness_seconds`` (default 24 h) before the newest
      trade of the topic's exchanges in the snapshot read, the topic has committed offsets and no
      load-shed (pending) ranges.

    The second rule rests on one stated contract of a topic's producer: a trade reaches the topic
    no later than ``max_trade_lateness_seconds`` after the newest trade already committed from it
    (Binance streams in trade-time order, so a live feed is seconds behind; re-playing an old
    recording into a topic that already holds newer data breaks the contract: raise the setting,
    or set it to 0 to turn the rule off). Topics not listed in ``topic_exchanges`` are always read.

When Kafka is down
    The tail is needed and the broker does not answer within ``kafka_timeout_seconds`` (3 s):
    the query raises :class:`KafkaUnavailableError` naming the missing offsets and the fixes, or,
    with ``allow_partial=True``, returns the Iceberg part alone and warns (a
    :class:`KafkaTailMissingWarning` and a log line) naming the offset ranges left out.

Works without Dagster: ``HybridQueryResource().recent_trades("BTCUSDT", minutes=15)`` reads
K2_HOME and K2_KAFKA_BOOTSTRAP from the environment.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import polars as pl
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr
from pyiceberg.conversions import from_bytes
from pyiceberg.expressions import EqualTo, In
from pyiceberg.table import Table
from pyiceberg.types import TimestamptzType

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import QUOTES, TRADES
from k2_resources.errors import K2Error, KafkaUnavailableError
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.offsets import PendingRange, committed_offsets, pending_ranges, snapshot_committed_offsets
from k2_resources.trades.iceberg_read import DEFAULT_READ_PATH, RowFilter, ScanStats, SnapshotReader, load_for_read
from k2_resources.trades.kafka_tail import KafkaTail, TailStats

log = logging.getLogger(__name__)

_ORDER = [
    ("timestamp", "ascending"),
    ("platform_sequence", "ascending"),
    ("source_sequence", "ascending"),
    ("message_id", "ascending"),
]


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
    kafka_skipped: dict[str, str] = field(default_factory=dict)  # topic -> why its tail was not read
    missing: dict[str, str] = field(default_factory=dict)  # topic -> offsets left out (allow_partial)

    @property
    def partial(self) -> bool:
        """True when Kafka was down and the result holds the Iceberg part only (allow_partial=True)."""
        return bool(self.missing)


class KafkaTailMissingWarning(UserWarning):
    """A hybrid read returned the Iceberg part only: Kafka was unreachable and allow_partial=True."""


def _utc(moment: datetime | None, name: str) -> datetime | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise K2Error(
            f"{name}={moment.isoformat()} has no time zone; pass an aware datetime, "
            "e.g. datetime(..., tzinfo=timezone.utc)"
        )
    return moment.astimezone(UTC)


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
    topics: list[str] = Field(
        default_factory=lambda: [BINANCE_TRADES_TOPIC],
        description="Kafka topics of trade V2 records whose tails are read",
    )
    read_path: str = Field(
        default=DEFAULT_READ_PATH,
        description="Iceberg read path: polars (default, measured fastest), planned, duckdb, pyiceberg",
    )
    producer_clock_slack_seconds: float = Field(
        default=300.0,
        description="how far a Kafka message timestamp may lag the trade's time; widens the offsets_for_times bound",
    )
    max_cached_tail_rows: int = Field(default=2_000_000, description="decoded tail rows kept per partition")
    topic_exchanges: dict[str, list[str]] = Field(
        default_factory=lambda: {BINANCE_TRADES_TOPIC: ["BINANCE"]},
        description="the exchanges whose trades each topic carries; a query for another exchange skips that "
        "topic's tail. Topics not listed may carry any exchange and are always read",
    )
    max_trade_lateness_seconds: float = Field(
        default=86_400.0,
        ge=0,
        description="a trade reaches its topic at most this long after the newest trade committed from it; a "
        "window ending that long before the newest committed trade skips the tail (0: never skip)",
    )
    kafka_timeout_seconds: float = Field(
        default=3.0,
        gt=0,
        description="how long a query waits for Kafka to answer before failing (or, with allow_partial, "
        "returning the Iceberg part)",
    )

    _reader: SnapshotReader | None = PrivateAttr(default=None)
    _tail: KafkaTail | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    # Called after the table metadata was read and before Kafka is: tests commit a batch here.
    _after_metadata_read: Callable[[], None] | None = PrivateAttr(default=None)
    _last_stats: QueryStats | None = PrivateAttr(default=None)
    _newest_trades: dict[tuple, datetime | None] = PrivateAttr(default_factory=dict)

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
                self._tail = KafkaTail(
                    self.kafka, max_cached_rows=self.max_cached_tail_rows, connect_timeout_s=self.kafka_timeout_seconds
                )
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
        allow_partial: bool = False,
    ) -> pl.DataFrame | pa.Table:
        """Trades of ``symbols`` (None: all) with start <= timestamp < end, ordered by timestamp.

        ``as_of``: a snapshot id or an aware datetime; reads that Iceberg snapshot only.
        ``arrow=True`` returns a pyarrow Table in market.trades' schema instead of polars.
        ``allow_partial=True``: when Kafka is down, return the Iceberg part and warn
        (:class:`KafkaTailMissingWarning`) instead of raising :class:`KafkaUnavailableError`.
        """
        row_filter = RowFilter(_symbols(symbols), _utc(start, "start"), _utc(end, "end"), exchange)
        if row_filter.start and row_filter.end and row_filter.end <= row_filter.start:
            raise K2Error(
                f"end {row_filter.end.isoformat()} is not after start {row_filter.start.isoformat()}; swap them"
            )
        stats = QueryStats()
        table = load_for_read(self.iceberg, TRADES)  # the ONE metadata read of this query
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
            # The two parts are independent (the snapshot and the offsets are pinned above): the Iceberg
            # read (mostly polars and pyarrow, which release the GIL) runs while Kafka answers.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2-hybrid-iceberg") as pool:
                iceberg_read = pool.submit(
                    self._snapshot_reader().read_frame, table, stats.snapshot_id, row_filter, stats=stats.iceberg
                )
                kafka_part = self._kafka_part(table, row_filter, stats, allow_partial)
                iceberg_part = iceberg_read.result()
            stats.iceberg_rows, stats.kafka_rows = iceberg_part.height, kafka_part.height
            merged = merge_trades([iceberg_part, kafka_part], stats)
        self._last_stats = stats
        return to_trades_arrow(merged) if arrow else merged

    def recent_trades(
        self,
        symbol: str,
        minutes: float = 15,
        now: datetime | None = None,
        arrow: bool = False,
        allow_partial: bool = False,
    ) -> pl.DataFrame | pa.Table:
        """The trades of ``symbol`` in the last ``minutes`` before ``now`` (default: the wall clock)."""
        if minutes <= 0:
            raise K2Error(f"minutes={minutes} must be positive")
        end = _utc(now, "now") or datetime.now(UTC)
        # Inclusive of ``now``: the window ends one microsecond after it.
        return self.trades(
            symbol,
            end - timedelta(minutes=minutes),
            end + timedelta(microseconds=1),
            arrow=arrow,
            allow_partial=allow_partial,
        )

    def _snapshot_as_of(self, table: Table, as_of: int | datetime):
        if isinstance(as_of, datetime):
            moment = _utc(as_of, "as_of")
            snapshot = table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
            if snapshot is None:
                raise K2Error(
                    f"{table.name()} has no snapshot at or before {moment.isoformat()}; "
                    "pick a later time (see the table's snapshots with `k2 query sql`)"
                )
            return snapshot
        snapshot = table.snapshot_by_id(int(as_of))
        if snapshot is None:
            raise K2Error(
                f"{table.name()} has no snapshot {as_of}; it may have expired; "
                "list the snapshots with table.snapshots() or pass a time instead"
            )
        return snapshot

    def tail_skip_reason(
        self,
        table: Table,
        snapshot_id: int | None,
        topic: str,
        row_filter: RowFilter,
        committed: dict[int, int],
        pending: list[PendingRange],
    ) -> str | None:
        """Why ``topic``'s tail cannot hold a row of the query (None: it may, read it). See the module doc."""
        exchanges = self.topic_exchanges.get(topic)
        if not exchanges:
            return None
        if row_filter.exchange is not None and row_filter.exchange not in exchanges:
            return f"{topic} carries only {', '.join(exchanges)} trades; the query asks for {row_filter.exchange}"
        lateness = timedelta(seconds=self.max_trade_lateness_seconds)
        if (
            row_filter.end is None
            or not lateness
            or not committed
            or pending
            # the newest committed trade is not in the future, so a later end can never qualify
            or row_filter.end > datetime.now(UTC) - lateness
        ):
            return None
        newest = self.newest_committed_trade(table, snapshot_id, tuple(exchanges))
        if newest is None or row_filter.end > newest - lateness:
            return None
        return (
            f"the window ends at {row_filter.end.isoformat()}, at least {self.max_trade_lateness_seconds:g}s "
            f"before the newest committed {'/'.join(exchanges)} trade ({newest.isoformat()})"
        )

    def newest_committed_trade(
        self, table: Table, snapshot_id: int | None, exchanges: tuple[str, ...]
    ) -> datetime | None:
        """The newest trade time of ``exchanges`` in the snapshot, from the data files' column bounds
        (None: no such rows, or a file without bounds or with delete files: unknown). Cached per snapshot."""
        if snapshot_id is None:
            return None
        key = (table.metadata.table_uuid, snapshot_id, exchanges)
        if key in self._newest_trades:
            return self._newest_trades[key]
        condition = EqualTo("exchange", exchanges[0]) if len(exchanges) == 1 else In("exchange", exchanges)
        field_id = table.schema().find_field("timestamp").field_id
        newest: datetime | None = None
        for task in table.scan(row_filter=condition, snapshot_id=snapshot_id).plan_files():
            bound = (task.file.upper_bounds or {}).get(field_id)
            if bound is None or task.delete_files:
                newest = None
                break
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=from_bytes(TimestamptzType(), bound))
            newest = moment if newest is None else max(newest, moment)
        with self._lock:
            if len(self._newest_trades) > 64:
                self._newest_trades.clear()
            self._newest_trades[key] = newest
        return newest

    def _kafka_part(self, table: Table, row_filter: RowFilter, stats: QueryStats, allow_partial: bool) -> pl.DataFrame:
        frames: list[pl.DataFrame] = []
        for topic in self.topics:
            committed = stats.committed.get(topic, {})
            pending = stats.pending.get(topic, [])
            reason = self.tail_skip_reason(table, stats.snapshot_id, topic, row_filter, committed, pending)
            if reason is not None:
                stats.kafka_skipped[topic] = reason
                continue
            try:
                frames += self._topic_tail(topic, row_filter, stats)
            except KafkaUnavailableError as exc:
                missing = missing_offsets(topic, committed, pending)
                if not allow_partial:
                    raise KafkaUnavailableError(
                        f"{exc}. The trades of {missing} are only in Kafka. Fix: start Kafka, or pass "
                        "allow_partial=True (CLI: --allow-partial) for the Iceberg part alone; a query for an "
                        "exchange without a topic (exchange='ASX') never reads Kafka"
                    ) from exc
                stats.missing[topic] = missing
                message = (
                    f"Kafka is unreachable ({exc}); the result holds the Iceberg part only and lacks the "
                    f"trades of {missing}"
                )
                log.warning(message)
                warnings.warn(message, KafkaTailMissingWarning, stacklevel=3)
        if not frames:
            return pl.from_arrow(TRADES.arrow_schema().empty_table())
        return pl.concat(frames)

    def _topic_tail(self, topic: str, row_filter: RowFilter, stats: QueryStats) -> list[pl.DataFrame]:
        """The rows of ``topic`` above its committed offsets, and of its pending ranges, matching the filter."""
        tail = self.kafka_tail()
        frames: list[pl.DataFrame] = []
        committed = stats.committed.get(topic, {})
        partitions = sorted(set(tail.partitions(topic)) | set(committed))
        if not partitions:
            return frames
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
        return frames

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
        table = load_for_read(self.iceberg, QUOTES)
        snapshot = self._snapshot_as_of(table, as_of) if as_of is not None else table.current_snapshot()
        rows = self._snapshot_reader().read(table, snapshot.snapshot_id if snapshot else None, row_filter)
        schema = QUOTES.arrow_schema()
        rows = (rows.cast(schema) if rows.schema != schema else rows).sort_by(
            [("timestamp", "ascending"), ("source_sequence", "ascending"), ("message_id", "ascending")]
        )
        return rows if arrow else pl.from_arrow(rows)

    def teardown_after_execution(self, context) -> None:
        self.close()

    def close(self) -> None:
        """Close the cached Kafka consumer and DuckDB connections."""
        if self._tail is not None:
            self._tail.close()
        if self._reader is not None:
            self._reader.close()


def missing_offsets(topic: str, committed: dict[int, int], pending: list[PendingRange]) -> str:
    """The offsets of ``topic`` a hybrid read needs from Kafka, in words (the log end is unknown here)."""
    if committed:
        parts = [f"{topic}[{p}] offsets {offset}.. (to the log end)" for p, offset in sorted(committed.items())]
    else:
        parts = [f"{topic}: every offset (market.trades has committed none of it yet)"]
    parts += [f"{topic}[{r.partition}] offsets {r.start}..{r.end - 1} ({r.kind.lower()})" for r in pending]
    return ", ".join(parts)


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
    from k2_resources.catalog.resource import to_arrow
    from k2_resources.sink.microbatch import read_range

    records: list[dict] = []
    for entry in pending:
        if (
            row_filter.symbols is not None
            and entry.kind == "deferred"
            and not set(entry.symbols) & set(row_filter.symbols)
        ):
            continue  # none of the wanted symbols is missing from this range
        records += [r for r in read_range(kafka, entry.range).records if entry.is_missing(r["symbol"])]
    return pl.from_arrow(to_arrow(records, TRADES))
