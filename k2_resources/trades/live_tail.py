"""The serving path of a long-lived process (the API): trades from memory wherever they can be.

:class:`ServingReader` answers :meth:`HybridQueryResource.read_trades` with the same rows and the
same boundary (the Iceberg snapshot below its committed offsets, the Kafka log above them, log
end captured after the query arrived), but keeps what does not change between queries:

- table metadata: loaded again only when the catalog points at a new metadata file (one cheap
  SQLite row per query with the default catalog), by one thread while the others wait;
- scan plans: per snapshot and per (symbols, exchange, time bounds widened to whole hours), so a
  moving window ("the last 5 minutes") hits the same plan until the table changes;
- data files: immutable, so each planned file's rows of the query's symbols/exchange are kept
  sorted by time (LRU within ``memory_budget_bytes``) and a query slices them by binary search;
- the live tail: the decoded Kafka rows above the committed offsets stay in the hybrid's
  :class:`~k2_resources.trades.kafka_tail.KafkaTail`; the log end is asked by ONE look-up at a time
  shared by every query that arrived before it started (:class:`SharedEndOffsets`), so 50
  concurrent queries cost one broker round trip, not 50, and none misses a message produced
  before it arrived.

Anything unusual (``as_of``, load-shed pending ranges, delete files in the plan, a catalog other
than SQLite) goes to the hybrid resource's own read: slower, identical answers.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl
from pyiceberg.table import Table

from k2_resources.catalog.settings import catalog_properties
from k2_resources.catalog.tables import TRADES
from k2_resources.errors import K2Error, KafkaUnavailableError
from k2_resources.query.sql_query import NAMESPACE, sqlite_table_locations
from k2_resources.sink.offsets import committed_offsets, pending_ranges
from k2_resources.trades.hybrid import HybridQueryResource
from k2_resources.trades.hybrid_result import (
    HybridResult,
    KafkaTailMissingWarning,
    QueryStats,
    as_frame,
    chosen_symbols,
    merge_trades,
    missing_offsets,
    utc,
)
from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader, load_for_read, object_store_options
from k2_resources.trades.kafka_tail import KafkaTail
from k2_resources.trades.serving_cache import ManifestPlans, SnapshotRows, micros_of
from k2_resources.trades.serving_table import ServedTable

log = logging.getLogger(__name__)

DEFAULT_MEMORY_BUDGET_BYTES = 512 * 1024 * 1024
PARTITIONS_TTL_S = 5.0
HOT_FILTER_S = 30.0  # a filter queried this recently is prepared for each new version of the table
_HOUR = timedelta(hours=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _floor_hour(moment: datetime | None) -> datetime | None:
    return None if moment is None else _EPOCH + ((moment - _EPOCH) // _HOUR) * _HOUR


def _ceil_hour(moment: datetime | None) -> datetime | None:
    return None if moment is None else _EPOCH + -((_EPOCH - moment) // _HOUR) * _HOUR


def planning_filter(row_filter: RowFilter) -> RowFilter:
    """``row_filter`` with its window widened to whole hours: the files it plans are a superset of
    the exact filter's, and the rows are cut exactly afterwards."""
    return RowFilter(row_filter.symbols, _floor_hour(row_filter.start), _ceil_hour(row_filter.end), row_filter.exchange)


class TableCache:
    """``market.trades`` as of now, reloaded only when the catalog row names a new metadata file."""

    def __init__(self, hybrid: HybridQueryResource) -> None:
        self.hybrid = hybrid
        self._table: Table | None = None
        self._location: str | None = None
        self._lock = threading.Lock()

    def _location_now(self) -> str | None:
        iceberg = self.hybrid.iceberg
        properties = catalog_properties(iceberg.catalog_properties)
        return (sqlite_table_locations(properties, iceberg.catalog_name, NAMESPACE) or {}).get(TRADES.identifier)

    def current(self) -> Table:
        location = self._location_now()
        if location is None:  # another catalog, or no table yet: today's read (it may create the table)
            return load_for_read(self.hybrid.iceberg, TRADES)
        table = self._table
        if table is not None and self._location == location:
            return table
        with self._lock:  # one thread loads a new metadata file; the others then find it here
            if self._table is None or self._location != location:
                self._table, self._location = load_for_read(self.hybrid.iceberg, TRADES), location
            return self._table


@dataclass(frozen=True)
class _Sorted:
    rows: pl.DataFrame  # sorted by timestamp
    times: pl.Series  # the timestamp column, for binary search


class FileRows:
    """Rows of immutable data files for a (symbols, exchange) key, sorted by time, LRU within a byte budget."""

    def __init__(self, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> None:
        self.memory_budget_bytes = memory_budget_bytes
        self._entries: OrderedDict[tuple, tuple[_Sorted, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def rows(self, table: Table, path: str, row_filter: RowFilter) -> _Sorted:
        key = (path, row_filter.symbols, row_filter.exchange)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries.move_to_end(key)
                return hit[0]
        scan = pl.scan_parquet([path], hive_partitioning=False, storage_options=object_store_options(table, [path]))
        keep = RowFilter(row_filter.symbols, None, None, row_filter.exchange).polars()
        frame = (scan.filter(keep) if keep is not None else scan).collect().sort("timestamp")
        entry = _Sorted(frame, frame["timestamp"])
        size = int(frame.estimated_size())
        with self._lock:
            if key not in self._entries and size <= self.memory_budget_bytes:
                self._entries[key] = (entry, size)
                self._bytes += size
                while self._bytes > self.memory_budget_bytes:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        return entry

    def window(self, table: Table, path: str, row_filter: RowFilter) -> pl.DataFrame:
        """The file's rows of the filter's symbols, exchange and [start, end)."""
        entry = self.rows(table, path, row_filter)
        low, high = 0, entry.rows.height
        if row_filter.start is not None:
            low = int(entry.times.search_sorted(row_filter.start, side="left"))
        if row_filter.end is not None:
            high = int(entry.times.search_sorted(row_filter.end, side="left"))
        return entry.rows.slice(low, max(0, high - low))


@dataclass
class _Lookup:
    started: float
    ends: dict[int, int] | None = None
    error: BaseException | None = None


class SharedEndOffsets:
    """Log-end offsets of a topic for concurrent queries: one look-up at a time, and a query takes the
    result of a look-up that started after the query arrived (so it sees every message produced
    before it), joining one in flight or starting the next."""

    def __init__(self, tail: KafkaTail) -> None:
        self.tail = tail
        self._done: dict[tuple, _Lookup] = {}
        self._running: set[tuple] = set()
        self._cond = threading.Condition()

    def ends(self, topic: str, partitions: list[int]) -> dict[int, int]:
        key = (topic, tuple(partitions))
        arrived = time.monotonic()
        with self._cond:
            while True:
                done = self._done.get(key)
                if done is not None and done.started >= arrived:
                    if done.error is not None:
                        raise done.error
                    assert done.ends is not None
                    return done.ends
                if key not in self._running:
                    self._running.add(key)
                    break
                self._cond.wait(timeout=1.0)
        lookup = _Lookup(time.monotonic())
        try:
            lookup.ends = self.tail.end_offsets(topic, partitions)
        except BaseException as exc:
            lookup.error = exc
            raise
        finally:
            with self._cond:
                self._done[key] = lookup
                self._running.discard(key)
                self._cond.notify_all()
        return lookup.ends


@dataclass(frozen=True)
class ServedResult(HybridResult):
    """A hybrid result with the identity of everything it was read from (None: not known): the
    planned data files and the Kafka offset ranges. Two reads of one query with the same version
    have the same rows, so an answer rendered from one serves the other."""

    version: tuple | None = None


class ServingReader:
    """:meth:`HybridQueryResource.read_trades` for a long-lived process, with the caches of the module doc."""

    def __init__(self, hybrid: HybridQueryResource, memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES) -> None:
        self.hybrid = hybrid
        self.tables = TableCache(hybrid)
        self.files = FileRows(memory_budget_bytes)
        self.plans = ManifestPlans()
        self.snapshots = SnapshotRows()
        self._empties: dict[tuple, pl.DataFrame] = {}
        self._newest: dict[str, datetime] = {}  # per topic: the newest committed trade seen (never decreases)
        self._ends: SharedEndOffsets | None = None
        self._partitions: dict[str, tuple[float, list[int]]] = {}
        self._hot: dict[tuple, tuple[float, RowFilter]] = {}  # snapshot-rows key -> (last queried, filter)
        self._lock = threading.Lock()
        self.served = ServedTable(hybrid.topics, self._prepare)

    def table(self) -> Table:
        """``market.trades`` as queries read it now: the newest version, or the one before it while the
        newest is prepared aside when both hold the same rows (:mod:`k2_resources.trades.serving_table`)."""
        return self.served.table(self.tables.current())

    def _prepare(self, table: Table) -> None:
        """Plans and sorted rows of ``table``'s snapshot for the filters queried lately."""
        snapshot = table.current_snapshot()
        if snapshot is None:
            return
        empty = self._empty(table)
        recent = time.monotonic() - HOT_FILTER_S
        for key, (queried, widened) in list(self._hot.items()):
            if queried < recent:
                self._hot.pop(key, None)
                continue
            if key[0] != table.metadata.table_uuid:
                continue
            files = self.plans.files(table, snapshot.snapshot_id, widened)
            if files is not None:
                self.snapshots.rows(key, snapshot.snapshot_id, files, self._file_reader(table, widened), empty)

    def _file_reader(self, table: Table, row_filter: RowFilter) -> Callable[[str], pl.DataFrame]:
        return lambda path: self.files.rows(table, path, row_filter).rows

    def close(self) -> None:
        self.served.close()

    def snapshot_reader(self) -> SnapshotReader:
        """The hybrid's reader, whose scan plans are cached per (snapshot, filter)."""
        return self.hybrid._snapshot_reader()

    def read_trades(
        self,
        symbols: str | Sequence[str] | None,
        start: datetime | None = None,
        end: datetime | None = None,
        exchange: str | None = None,
        as_of: int | datetime | None = None,
        allow_partial: bool = False,
        head: int | None = None,
    ) -> HybridResult:
        """The rows and statistics of ``hybrid.read_trades`` with the same arguments; with ``head``, only
        (at least) the first ``head`` rows in (timestamp, message_id) order are certain to be there
        (each part is cut at ``head`` before the merge: a page needs no more)."""
        if as_of is not None:
            return self.hybrid.read_trades(symbols, start, end, exchange, as_of, allow_partial)
        row_filter = RowFilter(chosen_symbols(symbols), utc(start, "start"), utc(end, "end"), exchange)
        if row_filter.start and row_filter.end and row_filter.end <= row_filter.start:
            raise K2Error(
                f"end {row_filter.end.isoformat()} is not after start {row_filter.start.isoformat()}; swap them"
            )
        table = self.table()
        stats = QueryStats()
        current = table.current_snapshot()
        stats.snapshot_id = current.snapshot_id if current else None
        stats.committed = {topic: committed_offsets(table, topic) for topic in self.hybrid.topics}
        stats.pending = {topic: pending_ranges(table, topic) for topic in self.hybrid.topics}
        if any(stats.pending.values()):  # load-shed ranges: rare, read the way the hybrid does
            return self.hybrid.read_trades(symbols, start, end, exchange, None, allow_partial)
        planned = self._iceberg_part(table, row_filter, stats, head)
        if planned is None:  # delete files: pyiceberg's reader applies them
            return self.hybrid.read_trades(symbols, start, end, exchange, None, allow_partial)
        iceberg_part, files = planned
        kafka_part = self._kafka_part(table, row_filter, stats, allow_partial)
        if head is not None and kafka_part.height > head:
            kafka_part = kafka_part.sort(["timestamp", "message_id"]).head(head)
        stats.iceberg_rows, stats.kafka_rows = iceberg_part.height, kafka_part.height
        version = (files, tuple(sorted(stats.kafka.ranges.items())), tuple(sorted(stats.missing.items())))
        return ServedResult(merge_trades([iceberg_part, kafka_part], stats), stats, version)

    def _iceberg_part(
        self, table: Table, row_filter: RowFilter, stats: QueryStats, head: int | None
    ) -> tuple[pl.DataFrame, tuple[str, ...]] | None:
        """The Iceberg part and the files it was read from; None when delete files apply."""
        stats.iceberg.path = "serving"
        empty = self._empty(table)
        if stats.snapshot_id is None:
            return empty, ()
        widened = planning_filter(row_filter)
        files = self.plans.files(table, stats.snapshot_id, widened)
        if files is None:
            return None
        stats.iceberg.files_planned = len(files)
        key = (table.metadata.table_uuid, widened)
        self._hot[key] = (time.monotonic(), widened)
        rows = self.snapshots.rows(key, stats.snapshot_id, files, self._file_reader(table, row_filter), empty)
        frame = rows.window(micros_of(row_filter.start), micros_of(row_filter.end), head)
        stats.iceberg.rows = frame.height
        return frame, files

    def _empty(self, table: Table) -> pl.DataFrame:
        """No rows, in the table's schema (kept per schema: converting it costs milliseconds)."""
        key = (table.metadata.table_uuid, table.metadata.current_schema_id)
        empty = self._empties.get(key)
        if empty is None:
            empty = self._empties[key] = as_frame(table.schema().as_arrow().empty_table())
        return empty

    def _skip_reason(
        self, table: Table, snapshot_id: int | None, topic: str, row_filter: RowFilter, committed: dict[int, int]
    ) -> str | None:
        """The hybrid's tail_skip_reason, without working out the newest committed trade again for each
        snapshot: it never decreases (appends add newer trades, compaction keeps them), so a window that
        ended long enough before it once still does."""
        exchanges = self.hybrid.topic_exchanges.get(topic)
        lateness = timedelta(seconds=self.hybrid.max_trade_lateness_seconds)
        newest = self._newest.get(topic)
        if (
            exchanges
            and newest is not None
            and lateness
            and committed
            and row_filter.end is not None
            and (row_filter.exchange is None or row_filter.exchange in exchanges)
            and row_filter.end <= newest - lateness
        ):
            return (
                f"the window ends at {row_filter.end.isoformat()}, at least {lateness.total_seconds():g}s "
                f"before the newest committed {'/'.join(exchanges)} trade ({newest.isoformat()})"
            )
        reason = self.hybrid.tail_skip_reason(table, snapshot_id, topic, row_filter, committed, [])
        if reason is not None and exchanges and snapshot_id is not None and row_filter.exchange in (None, *exchanges):
            found = self.hybrid.newest_committed_trade(table, snapshot_id, tuple(exchanges))  # cached by the hybrid
            if found is not None:
                self._newest[topic] = max(found, self._newest.get(topic, found))
        return reason

    def _shared_ends(self) -> SharedEndOffsets:
        with self._lock:
            if self._ends is None:
                self._ends = SharedEndOffsets(self.hybrid.kafka_tail())
            return self._ends

    def _topic_partitions(self, tail: KafkaTail, topic: str) -> list[int]:
        known = self._partitions.get(topic)
        if known is not None and time.monotonic() - known[0] < PARTITIONS_TTL_S:
            return known[1]
        found = tail.partitions(topic)
        if found:  # a topic not created yet is asked again next time
            self._partitions[topic] = (time.monotonic(), found)
        return found

    def _kafka_part(self, table: Table, row_filter: RowFilter, stats: QueryStats, allow_partial: bool) -> pl.DataFrame:
        """The hybrid's Kafka part (same skips, same errors) with shared log-end look-ups."""
        frames: list[pl.DataFrame] = []
        for topic in self.hybrid.topics:
            committed = stats.committed.get(topic, {})
            reason = self._skip_reason(table, stats.snapshot_id, topic, row_filter, committed)
            if reason is not None:
                stats.kafka_skipped[topic] = reason
                continue
            try:
                frames.append(self._topic_tail(topic, row_filter, stats))
            except KafkaUnavailableError as exc:
                self._partitions.pop(topic, None)
                missing = missing_offsets(topic, committed, [])
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
                warnings.warn(message, KafkaTailMissingWarning, stacklevel=4)
        if not frames:
            return as_frame(TRADES.arrow_schema().empty_table())
        return pl.concat(frames) if len(frames) > 1 else frames[0]

    def _topic_tail(self, topic: str, row_filter: RowFilter, stats: QueryStats) -> pl.DataFrame:
        tail = self.hybrid.kafka_tail()
        committed = stats.committed.get(topic, {})
        partitions = sorted(set(self._topic_partitions(tail, topic)) | set(committed))
        if not partitions:
            return as_frame(TRADES.arrow_schema().empty_table())
        ends = self._shared_ends().ends(topic, partitions)
        for partition, done in committed.items():
            if ends.get(partition, 0) < done:
                raise K2Error(
                    f"{topic}[{partition}] ends at offset {ends.get(partition, 0)} but market.trades has "
                    f"committed up to {done}: the topic was recreated; set a new baseline with "
                    "`k2 offsets reset` before querying the tail"
                )
        lower = {p: committed.get(p, 0) for p in partitions}
        if row_filter.start is not None and not tail.covers(topic, {p: (lower[p], ends.get(p, 0)) for p in partitions}):
            bound_ms = int((row_filter.start.timestamp() - self.hybrid.producer_clock_slack_seconds) * 1000)
            by_time = tail.offsets_for_time(topic, partitions, max(bound_ms, 0))
            for p in partitions:
                found = by_time.get(p)
                lower[p] = max(lower[p], ends.get(p, 0) if found is None else found)
        tail.forget_below(topic, committed)
        return tail.read(topic, {p: (lower[p], ends.get(p, 0)) for p in partitions}, stats.kafka, row_filter.polars())
