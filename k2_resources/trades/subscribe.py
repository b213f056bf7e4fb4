"""Subscriptions to market.trades: history from Iceberg, then live from Kafka, each trade once.

The seam rests on the guarantee hybrid reads rest on (:mod:`k2_resources.trades.hybrid`): a
commit from Kafka writes its rows and the committed offsets ``O`` (per partition) in ONE Iceberg
transaction, so the snapshot that carries ``O`` holds exactly the messages below ``O`` (less
the load-shed ``pending`` ranges, whose rows are read from Kafka). A subscription therefore:

1. loads the table once and pins its current snapshot ``S`` and committed offsets ``O``;
2. delivers the history: ``S``'s rows matching the filters (symbols, exchange, at or after
   ``start``) plus the matching rows of ``S``'s pending ranges, deduplicated by message_id and
   ordered by (timestamp, message_id), in batches;
3. then follows the Kafka log of each trade topic from ``O`` per partition, for ever, delivering
   each new message that matches the filters.

A micro-batch that commits while the subscription runs changes nothing it delivers: its rows
are not in ``S`` and they are read from Kafka at their offsets. With ``start`` given, the Kafka
part starts no lower than offsets_for_times(start - slack) (the same producer-clock contract as
hybrid reads). Rows of one Kafka batch are deduplicated by message_id, as one hybrid read is.

Every delivered batch comes with a cursor (:mod:`k2_resources.trades.subscribe_cursor`) naming
the position exactly, so a reconnect with it yields exactly the rest. A history cursor names
``S`` and must outlive nothing more than the snapshot retention (hours); a live cursor names
Kafka offsets and outlives nothing more than Kafka's retention.

Live reads go through the resource's :class:`~k2_resources.trades.kafka_tail.KafkaTail`: the
subscriptions of one process (the API's fifty clients) share its decoded cache, so a new
message is fetched and decoded once; they share one thread following the log ends, and
subscribers at the same position with the same filters share each live batch (:class:`_LogEnds`).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeAlias

import polars as pl
import pyarrow as pa

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import committed_offsets, snapshot_pending_ranges
from k2_resources.trades.errors import CursorError
from k2_resources.trades.hybrid_result import as_frame, chosen_symbols, filter_rows, pending_rows, to_trades_arrow, utc
from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader, load_for_read
from k2_resources.trades.kafka_tail import KafkaTail
from k2_resources.trades.subscribe_cursor import HISTORY, LIVE, StreamCursor, from_micros, micros

__all__ = ["CursorError", "StreamCursor", "Subscription", "SubscriptionSource"]

Batch: TypeAlias = pl.DataFrame | pa.Table


@dataclass
class SubscriptionSource:
    """What a subscription reads from (built by ``HybridQueryResource.subscribe``)."""

    iceberg: IcebergResource
    kafka: KafkaResource
    tail: KafkaTail
    reader: SnapshotReader
    topics: list[str]
    topic_exchanges: dict[str, list[str]] = field(default_factory=dict)
    producer_clock_slack_seconds: float = 300.0


class _LogEnds:
    """What the subscriptions sharing one tail share: the topics' log ends, refreshed every
    ``interval_s`` by one thread while someone follows them (fifty subscribers polling make one
    broker request, not fifty, and one that is up to date asks nothing at all), and the last live
    batches by (ranges, filter), so subscribers at the same position with the same filters get the
    same frame: read, filtered and sorted once."""

    IDLE_S = 5.0  # the refresher stops this long after the last subscriber looked
    BATCHES = 64

    def __init__(self, tail: KafkaTail) -> None:
        self.tail = tail
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, dict[int, int]]] = {}
        self._following: dict[str, tuple[list[int], float]] = {}  # topic -> (partitions, last looked)
        self._refresher: threading.Thread | None = None
        self._interval_s = 0.025
        self._batches: dict[tuple, pl.DataFrame] = {}

    def get(self, topic: str, partitions: list[int], ttl_s: float) -> dict[int, int]:
        """The log ends, at most ``ttl_s`` old (asked of the broker when older)."""
        with self._lock:
            seen = self._seen.get(topic)
            if seen is not None and time.monotonic() - seen[0] < ttl_s and set(partitions) <= set(seen[1]):
                return seen[1]
        ends = self.tail.end_offsets(topic, partitions)
        with self._lock:
            self._seen[topic] = (time.monotonic(), ends)
        return ends

    def latest(self, topic: str, partitions: list[int], interval_s: float) -> dict[int, int] | None:
        """The last log ends seen (no I/O; None: none yet); keeps the refresher following ``topic``."""
        with self._lock:
            self._following[topic] = (partitions, time.monotonic())
            self._interval_s = min(self._interval_s, interval_s)
            if self._refresher is None or not self._refresher.is_alive():
                self._refresher = threading.Thread(target=self._refresh, name="k2-subscribe-log-ends", daemon=True)
                self._refresher.start()
            seen = self._seen.get(topic)
            return seen[1] if seen is not None else None

    def _refresh(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                wanted = {t: parts for t, (parts, looked) in self._following.items() if now - looked < self.IDLE_S}
                if not wanted:
                    self._refresher = None
                    return
            for topic, partitions in wanted.items():
                try:
                    self.get(topic, partitions, ttl_s=0.0)
                except K2Error:
                    pass  # a subscriber's own poll reports it
            time.sleep(self._interval_s)  # the next look at the log ends

    def batch(self, key: tuple, read: Callable[[], pl.DataFrame]) -> pl.DataFrame:
        """The live batch of ``key`` (ranges and filter), read once for every subscriber asking for it."""
        with self._lock:
            found = self._batches.get(key)
        if found is not None:
            return found
        frame = read()
        with self._lock:
            if len(self._batches) >= self.BATCHES:
                self._batches.pop(next(iter(self._batches)))
            self._batches[key] = frame
        return frame


_LOG_ENDS: weakref.WeakKeyDictionary[KafkaTail, _LogEnds] = weakref.WeakKeyDictionary()
_LOG_ENDS_LOCK = threading.Lock()


def _log_ends(tail: KafkaTail) -> _LogEnds:
    with _LOG_ENDS_LOCK:
        ends = _LOG_ENDS.get(tail)
        if ends is None:
            ends = _LOG_ENDS[tail] = _LogEnds(tail)
        return ends


class Subscription:
    """An iterator of trade batches (polars DataFrames or Arrow tables in market.trades' schema):
    the history first, then live trades as they reach Kafka. :attr:`cursor` is the position after
    the last batch returned; :meth:`poll` returns the next batch without waiting (for servers).

    Iterating waits for new trades, for ever unless ``idle_timeout_s`` is given (then it ends after
    that long without a new trade).
    """

    def __init__(
        self,
        source: SubscriptionSource,
        symbols: str | Sequence[str] | None = None,
        start: datetime | None = None,
        exchange: str | None = None,
        cursor: str | None = None,
        as_: Literal["arrow", "polars"] = "polars",
        batch_rows: int = 10_000,
        max_batch_messages: int = 50_000,
        poll_interval_s: float = 0.05,
        idle_timeout_s: float | None = None,
    ) -> None:
        if as_ not in ("arrow", "polars"):
            raise K2Error(f"as_={as_!r} is not a batch type; pass as_='polars' or as_='arrow'")
        if batch_rows < 1:
            raise K2Error(f"batch_rows={batch_rows} must be at least 1")
        chosen = chosen_symbols(symbols)
        begin = utc(start, "start")
        chosen_exchange = exchange.upper() if exchange else None
        if cursor:
            self._cursor: StreamCursor | None = StreamCursor.decode(cursor)
            self._cursor.check_filters(chosen, chosen_exchange, begin)
            chosen, chosen_exchange, begin = self._cursor.symbols, self._cursor.exchange, self._cursor.start
        else:
            self._cursor = None
        self.source = source
        self.row_filter = RowFilter(chosen, begin, None, chosen_exchange)
        self.as_ = as_
        self.batch_rows = batch_rows
        self.max_batch_messages = max_batch_messages
        self.poll_interval_s = poll_interval_s
        self.idle_timeout_s = idle_timeout_s
        self._history: pl.DataFrame | None = None  # rows still to deliver, ordered
        self._closed = False

    # -- the position -----------------------------------------------------------------------------

    @property
    def cursor(self) -> str:
        """The position after the last batch returned (before the first batch: where the stream starts)."""
        return self._position().encode()

    @property
    def phase(self) -> str:
        """``history`` while Iceberg rows remain, then ``live``."""
        return self._position().phase

    def _position(self) -> StreamCursor:
        if self._cursor is None:
            self._cursor = self._open()
        return self._cursor

    def _topics(self) -> list[str]:
        """The topics whose log can hold a matching trade (a topic of other exchanges is skipped)."""
        wanted = self.row_filter.exchange
        return [
            topic
            for topic in self.source.topics
            if wanted is None
            or not self.source.topic_exchanges.get(topic)
            or wanted in self.source.topic_exchanges[topic]
        ]

    def _open(self) -> StreamCursor:
        """Pin the current snapshot and its committed offsets: the start of a new stream."""
        table = load_for_read(self.source.iceberg, TRADES)
        snapshot = table.current_snapshot()
        offsets: dict[str, dict[int, int]] = {}
        tail = self.source.tail
        for topic in self._topics():
            committed = committed_offsets(table, topic)
            partitions = sorted(set(tail.partitions(topic)) | set(committed))
            lower = {p: committed.get(p, 0) for p in partitions}
            if self.row_filter.start is not None and partitions:
                # Only saves reading: a message below this offset was produced before start - slack.
                bound_ms = int((self.row_filter.start.timestamp() - self.source.producer_clock_slack_seconds) * 1000)
                by_time = tail.offsets_for_time(topic, partitions, max(bound_ms, 0))
                ends = tail.end_offsets(topic, partitions)
                for p in partitions:
                    found = by_time.get(p)
                    lower[p] = max(lower[p], ends.get(p, 0) if found is None else found)
            offsets[topic] = lower
        return StreamCursor(
            phase=HISTORY,
            symbols=self.row_filter.symbols,
            exchange=self.row_filter.exchange,
            start_us=micros(self.row_filter.start) if self.row_filter.start is not None else None,
            offsets=offsets,
            snapshot_id=snapshot.snapshot_id if snapshot is not None else None,
        )

    # -- reading ----------------------------------------------------------------------------------

    def poll(self) -> Batch | None:
        """The next batch if one is ready now (None: nothing new yet). Blocks only on I/O."""
        if self._closed:
            raise K2Error("the subscription is closed; open a new one with its cursor to continue")
        position = self._position()
        if position.phase == HISTORY:
            return self._next_history(position)
        return self._next_live(position)

    def _load_history(self, position: StreamCursor) -> pl.DataFrame:
        table = load_for_read(self.source.iceberg, TRADES)
        parts: list[pl.DataFrame] = []
        if position.snapshot_id is not None:
            snapshot = table.snapshot_by_id(position.snapshot_id)
            if snapshot is None:
                raise CursorError(
                    f"the cursor's snapshot {position.snapshot_id} of market.trades has expired (snapshot "
                    "retention, docs/operations.md), so the rest of its history cannot be told apart "
                    "exactly; drop the cursor and start a new stream with start=<the last time you received>"
                )
            parts.append(self.source.reader.read_frame(table, position.snapshot_id, self.row_filter))
            for topic in position.offsets:
                pending = snapshot_pending_ranges(table, snapshot, topic)
                if pending:
                    parts.append(
                        filter_rows(pending_rows(self.source.kafka, pending, self.row_filter), self.row_filter)
                    )
        frames = [part for part in parts if part.height]
        if not frames:
            return as_frame(TRADES.arrow_schema().empty_table())
        rows = pl.concat(frames, how="vertical_relaxed") if len(frames) > 1 else frames[0]
        rows = rows.filter(pl.col("message_id").is_first_distinct()).sort(["timestamp", "message_id"])
        if position.after is not None:
            moment, message_id = from_micros(position.after[0]), position.after[1]
            rows = rows.filter(
                (pl.col("timestamp") > moment) | ((pl.col("timestamp") == moment) & (pl.col("message_id") > message_id))
            )
        return rows

    def _next_history(self, position: StreamCursor) -> Batch | None:
        if self._history is None:
            self._history = self._load_history(position)
        batch, self._history = self._history.head(self.batch_rows), self._history.slice(self.batch_rows)
        if self._history.height == 0:
            # The last history rows: the position moves to the Kafka offsets the snapshot carried.
            self._cursor = StreamCursor(LIVE, position.symbols, position.exchange, position.start_us, position.offsets)
            self._history = None
        else:
            last = batch.row(batch.height - 1, named=True)
            self._cursor = StreamCursor(
                HISTORY,
                position.symbols,
                position.exchange,
                position.start_us,
                position.offsets,
                position.snapshot_id,
                (micros(last["timestamp"]), str(last["message_id"])),
            )
        return self._out(batch) if batch.height else None

    def has_news(self) -> bool:
        """False when the last log ends seen hold nothing past the position (no I/O): :meth:`poll`
        would return None. True in the history phase, or when it may return a batch."""
        position = self._cursor
        if position is None or position.phase == HISTORY:
            return True
        shared = _log_ends(self.source.tail)
        for topic, parts in position.offsets.items():
            ends = shared.latest(topic, sorted(parts), self.poll_interval_s / 2)
            if ends is None or any(ends.get(p, start) > start for p, start in parts.items()):
                return True
        return False

    def _next_live(self, position: StreamCursor) -> Batch | None:
        """Every message above the position in each topic, filtered; the position moves to the log ends."""
        offsets = {topic: dict(parts) for topic, parts in position.offsets.items()}
        shared = _log_ends(self.source.tail)
        ranges: dict[str, dict[int, tuple[int, int]]] = {}
        for topic, parts in offsets.items():
            if not parts:
                continue
            ends = shared.get(topic, sorted(parts), ttl_s=self.poll_interval_s / 2)
            # At most max_batch_messages a partition per batch: a subscriber far behind catches up in steps.
            ranges[topic] = {
                p: (start, min(ends[p], start + self.max_batch_messages))
                for p, start in parts.items()
                if ends.get(p, start) > start
            }
            for p, (_, end) in ranges[topic].items():
                parts[p] = end
        if offsets == position.offsets:
            return None
        key = (tuple(sorted((t, p, r) for t, rs in ranges.items() for p, r in rs.items())), self.row_filter)
        batch = shared.batch(key, lambda: self._read_live(ranges))
        self._cursor = StreamCursor(LIVE, position.symbols, position.exchange, position.start_us, offsets)
        return self._out(batch) if batch.height else None  # no rows: messages of other symbols

    def _read_live(self, ranges: dict[str, dict[int, tuple[int, int]]]) -> pl.DataFrame:
        frames = [
            self.source.tail.read(topic, parts, predicate=self.row_filter.polars())
            for topic, parts in ranges.items()
            if parts
        ]
        rows = [frame for frame in frames if frame.height]
        if not rows:
            return as_frame(TRADES.arrow_schema().empty_table())
        batch = pl.concat(rows, how="vertical_relaxed") if len(rows) > 1 else rows[0]
        if batch["message_id"].n_unique() != batch.height:
            batch = batch.filter(pl.col("message_id").is_first_distinct())
        return batch.sort(["timestamp", "platform_sequence"], maintain_order=True)

    def _out(self, batch: pl.DataFrame) -> Batch:
        return to_trades_arrow(batch) if self.as_ == "arrow" else batch

    # -- iteration --------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        idle_since = time.monotonic()
        while True:
            batch = self.poll()
            if batch is not None:
                return batch
            if self.idle_timeout_s is not None and time.monotonic() - idle_since >= self.idle_timeout_s:
                raise StopIteration
            time.sleep(self.poll_interval_s)  # the next poll of the log (not a wait for a test condition)

    def close(self) -> None:
        """End the subscription (the shared Kafka tail stays open for the resource's other readers)."""
        self._closed = True
        self._history = None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
