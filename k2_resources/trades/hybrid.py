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
from datetime import UTC, datetime, timedelta
from typing import Literal, cast

import polars as pl
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr
from pyiceberg.conversions import from_bytes
from pyiceberg.expressions import BooleanExpression, EqualTo, In
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot
from pyiceberg.types import TimestamptzType

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import QUOTES, TRADES
from k2_resources.errors import K2Error, KafkaUnavailableError
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import HYBRID
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.offsets import PendingRange, committed_offsets, pending_ranges, snapshot_committed_offsets
from k2_resources.trades.hybrid_result import (
    HybridResult,
    KafkaTailMissingWarning,
    QueryStats,
    as_frame,
    chosen_symbols,
    filter_rows,
    merge_trades,
    missing_offsets,
    pending_rows,
    to_trades_arrow,
    utc,
)
from k2_resources.trades.iceberg_read import DEFAULT_READ_PATH, RowFilter, SnapshotReader, load_for_read
from k2_resources.trades.kafka_tail import KafkaTail
from k2_resources.trades.subscribe import Subscription, SubscriptionSource

__all__ = [
    "HybridQueryResource",
    "HybridResult",
    "KafkaTailMissingWarning",
    "QueryStats",
    "merge_trades",
    "missing_offsets",
    "to_trades_arrow",
]

log = logging.getLogger(__name__)


class HybridQueryResource(ConfigurableResource):
    """Trades from Iceberg plus the Kafka tail not yet committed, exactly once; quotes from Iceberg."""

    kafka: KafkaResource = Field(default_factory=lambda: KafkaResource(role=HYBRID))
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
        """What the last ``trades()`` / ``recent_trades()`` call of this resource read (a notebook's view).

        Concurrent callers (the API) use :meth:`read_trades`, whose result carries its own stats.
        """
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

    def read_trades(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
        allow_partial: bool = False,
    ) -> HybridResult:
        """Trades of ``symbols`` (None: all) with start <= timestamp < end, ordered by timestamp, with
        the statistics of this read (a value of its own: safe while other threads query too).

        ``as_of``: a snapshot id or an aware datetime; reads that Iceberg snapshot only.
        ``allow_partial=True``: when Kafka is down, return the Iceberg part and warn
        (:class:`KafkaTailMissingWarning`) instead of raising :class:`KafkaUnavailableError`.
        """
        row_filter = RowFilter(chosen_symbols(symbols), utc(start, "start"), utc(end, "end"), exchange)
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
            return HybridResult(merge_trades([result], stats), stats)
        current = table.current_snapshot()
        stats.snapshot_id = current.snapshot_id if current else None
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
        return HybridResult(merge_trades([iceberg_part, kafka_part], stats), stats)

    def read_recent_trades(
        self, symbol: str, minutes: float = 15, now: datetime | None = None, allow_partial: bool = False
    ) -> HybridResult:
        """The trades of ``symbol`` in the last ``minutes`` up to ``now`` inclusive (default: the wall
        clock), with the statistics of this read."""
        if minutes <= 0:
            raise K2Error(f"minutes={minutes} must be positive")
        end = utc(now, "now") or datetime.now(UTC)
        # Inclusive of ``now``: the window ends one microsecond after it.
        return self.read_trades(
            symbol, end - timedelta(minutes=minutes), end + timedelta(microseconds=1), allow_partial=allow_partial
        )

    def trades(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
        allow_partial: bool = False,
    ) -> pl.DataFrame:
        """The rows of :meth:`read_trades` as a polars DataFrame; its stats become :attr:`last_stats`."""
        return self._keep_stats(self.read_trades(symbols, start, end, exchange, as_of, allow_partial))

    def trades_arrow(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
        allow_partial: bool = False,
    ) -> pa.Table:
        """:meth:`trades` as a pyarrow Table in market.trades' exact schema."""
        return to_trades_arrow(self.trades(symbols, start, end, exchange, as_of, allow_partial))

    def recent_trades(
        self, symbol: str, minutes: float = 15, now: datetime | None = None, allow_partial: bool = False
    ) -> pl.DataFrame:
        """The trades of ``symbol`` in the last ``minutes`` before ``now`` (default: the wall clock)."""
        return self._keep_stats(self.read_recent_trades(symbol, minutes, now, allow_partial))

    def recent_trades_arrow(
        self, symbol: str, minutes: float = 15, now: datetime | None = None, allow_partial: bool = False
    ) -> pa.Table:
        """:meth:`recent_trades` as a pyarrow Table in market.trades' exact schema."""
        return to_trades_arrow(self.recent_trades(symbol, minutes, now, allow_partial))

    def _keep_stats(self, result: HybridResult) -> pl.DataFrame:
        self._last_stats = result.stats
        return result.frame

    def _snapshot_as_of(self, table: Table, as_of: int | datetime) -> Snapshot:
        if isinstance(as_of, datetime):
            moment = utc(as_of, "as_of")
            assert moment is not None  # as_of is a datetime
            snapshot = table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000))
            if snapshot is None:
                raise K2Error(
                    f"{table.name()} keeps no snapshot at or before {moment.isoformat()}: time travel keeps what "
                    "the snapshot policy of continuous maintenance says (K2_SNAPSHOT_RETENTION_HOURS, "
                    "docs/operations.md); pick a later time or raise that setting"
                )
            return snapshot
        snapshot = table.snapshot_by_id(int(as_of))
        if snapshot is None:
            raise K2Error(
                f"{table.name()} keeps no snapshot {as_of}: it expired under the snapshot policy of continuous "
                "maintenance (K2_SNAPSHOT_RETENTION_HOURS, docs/operations.md); list the snapshots with "
                "table.snapshots() or pass a time instead"
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
        condition: BooleanExpression = (
            EqualTo(term="exchange", value=exchanges[0])
            if len(exchanges) == 1
            else In(term="exchange", literals=exchanges)
        )
        field_id = table.schema().find_field("timestamp").field_id
        newest: datetime | None = None
        for task in table.scan(row_filter=condition, snapshot_id=snapshot_id).plan_files():
            bound = (task.file.upper_bounds or {}).get(field_id)
            if bound is None or task.delete_files:
                newest = None
                break
            micros = cast(int, from_bytes(TimestamptzType(), bound))  # a timestamptz bound is microseconds
            moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=micros)
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
                # user -> trades() -> read_trades() -> _kafka_part(): the warning names the user's line
                warnings.warn(message, KafkaTailMissingWarning, stacklevel=4)
        if not frames:
            return as_frame(TRADES.arrow_schema().empty_table())
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
            lower = {p: max(lower[p], _or(by_time.get(p), ends[p])) for p in partitions}
        ranges = {p: (lower[p], ends.get(p, 0)) for p in partitions}
        tail.forget_below(topic, committed)
        frames.append(tail.read(topic, ranges, stats.kafka, predicate=row_filter.polars()))
        frames.append(filter_rows(pending_rows(self.kafka, stats.pending.get(topic, []), row_filter), row_filter))
        return frames

    def subscribe(
        self,
        symbols: str | Sequence[str] | None = None,
        start: datetime | None = None,
        exchange: str | None = None,
        cursor: str | None = None,
        as_: Literal["arrow", "polars"] = "polars",
        batch_rows: int = 10_000,
        idle_timeout_s: float | None = None,
    ) -> Subscription:
        """Trades from ``start`` on: the history from the pinned Iceberg snapshot, then live from Kafka
        at the offsets that snapshot committed, each trade once (see :mod:`k2_resources.trades.subscribe`).

        Iterate it for polars DataFrames (``as_="arrow"``: Arrow tables); ``.cursor`` after a batch
        resumes exactly after it (``subscribe(cursor=...)``, the filters travel in the cursor).
        Iteration waits for new trades for ever unless ``idle_timeout_s`` is given.
        """
        source = SubscriptionSource(
            self.iceberg, self.kafka, self.kafka_tail(), self._snapshot_reader(), list(self.topics),
            dict(self.topic_exchanges), self.producer_clock_slack_seconds,
        )  # fmt: skip
        return Subscription(source, symbols, start, exchange, cursor, as_, batch_rows, idle_timeout_s=idle_timeout_s)

    # ---------------------------------------------------------------------------------------
    # Quotes
    # ---------------------------------------------------------------------------------------

    def quotes_arrow(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
    ) -> pa.Table:
        """Quotes from ``market.quotes`` (Iceberg only: there is no quote topic yet) in its exact
        Arrow schema, ordered by timestamp."""
        row_filter = RowFilter(chosen_symbols(symbols), utc(start, "start"), utc(end, "end"), exchange)
        table = load_for_read(self.iceberg, QUOTES)
        snapshot = self._snapshot_as_of(table, as_of) if as_of is not None else table.current_snapshot()
        rows = self._snapshot_reader().read(table, snapshot.snapshot_id if snapshot else None, row_filter)
        schema = QUOTES.arrow_schema()
        return (rows.cast(schema) if rows.schema != schema else rows).sort_by(
            [("timestamp", "ascending"), ("source_sequence", "ascending"), ("message_id", "ascending")]
        )

    def quotes(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
    ) -> pl.DataFrame:
        """:meth:`quotes_arrow` as a polars DataFrame."""
        return as_frame(self.quotes_arrow(symbols, start, end, exchange, as_of))

    def teardown_after_execution(self, context) -> None:
        self.close()

    def close(self) -> None:
        """Close the cached Kafka consumer and DuckDB connections."""
        if self._tail is not None:
            self._tail.close()
        if self._reader is not None:
            self._reader.close()


def _or(value: int | None, default: int) -> int:
    return default if value is None else value
