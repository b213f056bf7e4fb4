"""The Kafka tail of the trade topics: decoded trade V2 rows by exact offset range, cached.

A Kafka offset names one immutable message, so rows decoded once for (topic, partition,
offset) can be served again without going back to the broker: the cache keeps one contiguous
decoded range per partition, extends it as the log grows, and drops what the table has
committed (those rows are read from Iceberg from then on). A query therefore only fetches
and decodes the offsets it has not seen yet, which keeps ``recent_trades`` well under half a
second while the tail holds 100K messages.

A new process's first query pays no kafka-python start-up when it can avoid it: partitions,
log ends and offsets for a time are plain requests to the bootstrap broker
(:mod:`k2_resources.kafka.direct_offsets`), and the partitions' ranges are fetched at once,
a connection each, column-wise (:mod:`k2_resources.kafka.columnar_fetch`). Whatever those
paths decline is asked of kafka-python's consumer, as before.

Kafka being down costs seconds, not half a minute: the consumer bootstraps within
``connect_timeout_s`` and every offset look-up waits at most that long, then raises
:class:`KafkaUnavailableError` (the consumer is dropped, the decoded rows are kept).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import polars as pl
import pyarrow as pa
from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from k2_resources.catalog.tables import TRADES
from k2_resources.errors import K2Error, KafkaUnavailableError
from k2_resources.kafka.columnar_fetch import BrokerConnection, fetch_range
from k2_resources.kafka.direct_offsets import DirectOffsets
from k2_resources.kafka.errors import FastFetchUnavailable
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.decode import decode_batch

log = logging.getLogger(__name__)

_EMPTY = cast(pl.DataFrame, pl.from_arrow(TRADES.arrow_schema().empty_table()))  # a Table gives a DataFrame
_MAX_PARALLEL_FETCHES = 8  # partitions fetched at once (a connection each)


@dataclass
class _Cached:
    """Decoded rows of offsets [start, end) of one partition (platform_sequence = offset)."""

    start: int
    end: int
    rows: pl.DataFrame


@dataclass
class TailStats:
    """What one read of the tail did."""

    fetched_messages: int = 0
    undecodable: int = 0
    poll_seconds: float = 0.0  # waiting on the broker and parsing record batches (kafka-python)
    decode_seconds: float = 0.0  # Avro decoding and building columns
    ranges: dict[tuple[str, int], tuple[int, int]] = field(default_factory=dict)


class KafkaTail:
    """Reads decoded trades of exact offset ranges; one consumer, reused; thread-safe."""

    def __init__(
        self,
        kafka: KafkaResource,
        max_cached_rows: int = 2_000_000,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 3.0,
    ) -> None:
        self.kafka = kafka
        self.max_cached_rows = max_cached_rows
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._consumer: KafkaConsumer | None = None
        self._direct: DirectOffsets | None = None
        self._cache: dict[tuple[str, int], _Cached] = {}
        self._lock = threading.RLock()
        # Kept between fetches: a live tail fetches a few new messages many times a second, and a new
        # thread and TCP connection per partition per fetch cost more than the fetch itself.
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._fetch_connections: dict[int, BrokerConnection] = {}

    def consumer(self) -> KafkaConsumer:
        if self._consumer is None:
            connect_ms = int(self.connect_timeout_s * 1000)
            # A short bootstrap: an unreachable broker is reported in seconds. Requests get a little
            # longer (they must outlast fetch_max_wait_ms), offset look-ups the connect timeout.
            self._consumer = self.kafka.consumer(
                group_id=None,
                max_poll_records=20_000,
                bootstrap_timeout_ms=connect_ms,
                request_timeout_ms=max(10_000, connect_ms),
            )
        return self._consumer

    def _unavailable(self, exc: BaseException) -> KafkaUnavailableError:
        """Drop the consumer (its connections are broken) and say what to do."""
        self._drop_consumer()
        if isinstance(exc, KafkaUnavailableError):
            return exc
        return KafkaUnavailableError(
            f"Kafka at {self.kafka.servers} did not answer within {self.connect_timeout_s:g}s "
            f"({type(exc).__name__}: {exc}); start the embedded broker with `k2 kafka start` or set "
            "K2_KAFKA_BOOTSTRAP to a running cluster"
        )

    def _drop_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                consumer.close(timeout_ms=0)
            except Exception:
                log.debug("closing the tail consumer failed", exc_info=True)

    def _ask_directly(self, question: Callable[[DirectOffsets], Any]) -> Any:
        """``question`` answered by plain requests to the bootstrap broker (see
        :mod:`k2_resources.kafka.direct_offsets`); None when that path declines, and the caller
        asks kafka-python's consumer instead."""
        if not isinstance(self.kafka, KafkaResource):
            return None
        try:
            if self._direct is None:
                self._direct = DirectOffsets(self.kafka.servers, f"{self.kafka.client_id}-tail", self.connect_timeout_s)
            return question(self._direct)
        except FastFetchUnavailable as exc:
            log.debug("asking kafka-python instead of the broker directly: %s", exc)
            self._drop_direct()
            return None

    def _drop_direct(self) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()

    def partitions(self, topic: str) -> list[int]:
        """The topic's partitions (empty when the topic does not exist yet)."""
        with self._lock:
            direct = self._ask_directly(lambda direct: direct.partitions(topic))
            if direct is not None:
                return direct
            try:
                consumer = self.consumer()
                found = consumer.partitions_for_topic(topic)
                if found is None:
                    consumer.topics()  # refresh metadata once: the topic may be new
                    found = consumer.partitions_for_topic(topic)
            except (KafkaError, OSError, KafkaUnavailableError) as exc:
                raise self._unavailable(exc) from exc
            return sorted(found or ())

    def end_offsets(self, topic: str, partitions: list[int]) -> dict[int, int]:
        with self._lock:
            direct = self._ask_directly(lambda direct: direct.end_offsets(topic, partitions))
            if direct is not None:
                return direct
            try:
                ends = self.consumer().end_offsets(
                    [TopicPartition(topic, p) for p in partitions], timeout_ms=int(self.connect_timeout_s * 1000)
                )
            except (KafkaError, OSError, KafkaUnavailableError) as exc:
                raise self._unavailable(exc) from exc
            return {tp.partition: offset for tp, offset in ends.items()}

    def offsets_for_time(self, topic: str, partitions: list[int], timestamp_ms: int) -> dict[int, int | None]:
        """Per partition, the first offset whose Kafka timestamp is >= timestamp_ms (None: none is)."""
        with self._lock:
            direct = self._ask_directly(lambda direct: direct.offsets_for_time(topic, partitions, timestamp_ms))
            if direct is not None:
                return direct
            try:
                found = self.consumer().offsets_for_times(
                    {TopicPartition(topic, p): timestamp_ms for p in partitions},
                    timeout_ms=int(self.connect_timeout_s * 1000),
                )
            except (KafkaError, OSError, KafkaUnavailableError) as exc:
                raise self._unavailable(exc) from exc
            return {tp.partition: (None if hit is None else hit.offset) for tp, hit in found.items()}

    def read(
        self,
        topic: str,
        ranges: dict[int, tuple[int, int]],
        stats: TailStats | None = None,
        predicate: pl.Expr | None = None,
    ) -> pl.DataFrame:
        """Rows of offsets [start, end) for each partition (and ``predicate``), partition then offset order."""
        stats = stats if stats is not None else TailStats()
        with self._lock:
            missing: dict[int, list[tuple[int, int]]] = {}
            for partition, (start, end) in ranges.items():
                stats.ranges[(topic, partition)] = (start, end)
                if end <= start:
                    continue
                cached = self._cache.get((topic, partition))
                if cached is None or start > cached.end or end < cached.start:
                    missing[partition] = [(start, end)]
                else:
                    gaps = []
                    if start < cached.start:
                        gaps.append((start, cached.start))
                    if end > cached.end:
                        gaps.append((cached.end, end))
                    if gaps:
                        missing[partition] = gaps
            if missing:
                try:
                    fetched = self._fetch(topic, missing, stats)
                except (KafkaError, OSError, KafkaUnavailableError) as exc:
                    raise self._unavailable(exc) from exc
                for partition, pieces in fetched.items():
                    self._store(topic, partition, pieces)
            frames: list[pl.DataFrame] = []
            for partition, (start, end) in sorted(ranges.items()):
                cached = self._cache.get((topic, partition))
                if end <= start or cached is None:
                    continue
                wanted = pl.col("platform_sequence").is_between(start, end, closed="left")
                frames.append(cached.rows.filter(wanted if predicate is None else predicate & wanted))
            if not frames:
                return _EMPTY.clear()
            return pl.concat(frames, how="vertical")

    def covers(self, topic: str, ranges: dict[int, tuple[int, int]]) -> bool:
        """True when every offset of ``ranges`` is decoded in the cache already."""
        with self._lock:
            for partition, (start, end) in ranges.items():
                if end <= start:
                    continue
                cached = self._cache.get((topic, partition))
                if cached is None or cached.start > start or cached.end < end:
                    return False
            return True

    def forget_below(self, topic: str, committed: dict[int, int]) -> None:
        """Drop cached rows the table has committed (they are read from Iceberg now)."""
        with self._lock:
            for partition, offset in committed.items():
                cached = self._cache.get((topic, partition))
                if cached is not None and cached.start < offset:
                    if offset >= cached.end:
                        del self._cache[(topic, partition)]
                    else:
                        rows = cached.rows.filter(pl.col("platform_sequence") >= offset)
                        self._cache[(topic, partition)] = _Cached(offset, cached.end, rows)

    def _store(self, topic: str, partition: int, pieces: list[tuple[int, int, pl.DataFrame]]) -> None:
        cached = self._cache.get((topic, partition))
        for start, end, rows in sorted(pieces, key=lambda piece: piece[0]):
            if cached is None or start > cached.end or end < cached.start:
                cached = _Cached(start, end, rows)  # disjoint from what was cached: replace it
            elif start < cached.start:
                cached = _Cached(start, cached.end, pl.concat([rows, cached.rows]))
            else:
                cached = _Cached(cached.start, max(end, cached.end), pl.concat([cached.rows, rows]))
        if cached is not None and cached.rows.height > self.max_cached_rows:
            keep = cached.rows.tail(self.max_cached_rows)
            cached = _Cached(int(keep["platform_sequence"][0]), cached.end, keep)
        if cached is not None:
            self._cache[(topic, partition)] = _Cached(cached.start, cached.end, cached.rows.rechunk())

    def _fetch(
        self, topic: str, wanted: dict[int, list[tuple[int, int]]], stats: TailStats
    ) -> dict[int, list[tuple[int, int, pl.DataFrame]]]:
        """Fetch and decode each wanted range; one range per partition at a time."""
        result: dict[int, list[tuple[int, int, pl.DataFrame]]] = {}
        queue = {p: list(ranges) for p, ranges in wanted.items()}
        while any(queue.values()):
            batch = {p: ranges.pop(0) for p, ranges in queue.items() if ranges}
            messages = self._fetch_column_wise(topic, batch, stats)
            rest = {p: batch[p] for p in batch if p not in messages}
            if rest:
                messages.update(self._fetch_ranges(self.consumer(), topic, rest, stats))
            for partition, (start, end) in batch.items():
                offsets, values = messages[partition]
                decoding = time.perf_counter()
                # The sink's whole-batch decoder: the same rows, and the same messages set aside,
                # that a micro-batch of this range would have (it dead-letters them; a query skips them).
                decoded = decode_batch(offsets, values)
                stats.undecodable += len(decoded.dead_letters)
                stats.fetched_messages += decoded.rows.num_rows
                frame = pl.from_arrow(decoded.rows) if decoded.rows.num_rows else _EMPTY.clear()
                assert isinstance(frame, pl.DataFrame)
                stats.decode_seconds += time.perf_counter() - decoding
                result.setdefault(partition, []).append((start, end, frame))
        return result

    def _fetch_column_wise(
        self, topic: str, ranges: dict[int, tuple[int, int]], stats: TailStats
    ) -> dict[int, tuple[Any, Any]]:
        """The ranges the sink's column-wise fetch can read (it parses no Python object per
        message), all partitions at once (one connection each: the broker's answers overlap); a
        partition it declines (another broker leads it, retention deleted offsets, compressed
        batches, ...) is left to kafka-python's path."""
        fetched: dict[int, tuple[Any, Any]] = {}
        if not isinstance(self.kafka, KafkaResource) or not ranges:
            return fetched
        polling = time.perf_counter()
        if self._fetch_pool is None:
            self._fetch_pool = ThreadPoolExecutor(max_workers=_MAX_PARALLEL_FETCHES, thread_name_prefix="k2-tail-fetch")
        client_id = f"{self.kafka.client_id}-tail"
        pending = {}
        for partition, (start, end) in ranges.items():
            try:
                connection = self._fetch_connections.get(partition)
                if connection is None:
                    connection = BrokerConnection(self.kafka.servers, client_id, min(self.timeout_s, 30.0))
                    self._fetch_connections[partition] = connection
            except FastFetchUnavailable as exc:
                log.debug("%s[%d]: reading the tail with kafka-python (%s)", topic, partition, exc)
                continue
            pending[partition] = self._fetch_pool.submit(
                fetch_range,
                self.kafka.servers,
                client_id,
                topic,
                partition,
                start,
                end,
                self.timeout_s,
                connection=connection,
            )
        for partition, future in pending.items():
            try:
                fetched[partition] = future.result()
            except FastFetchUnavailable as exc:
                self._drop_fetch_connection(partition)  # it may be broken or half-read: a new one next time
                log.debug("%s[%d]: reading the tail with kafka-python (%s)", topic, partition, exc)
        stats.poll_seconds += time.perf_counter() - polling
        return fetched

    def _drop_fetch_connection(self, partition: int) -> None:
        connection = self._fetch_connections.pop(partition, None)
        if connection is not None:
            connection.close()

    def _fetch_ranges(
        self, consumer: KafkaConsumer, topic: str, ranges: dict[int, tuple[int, int]], stats: TailStats
    ) -> dict[int, tuple[list[int], list[bytes | None]]]:
        """The raw messages of each range: (offsets, values) per partition."""
        partitions = {p: TopicPartition(topic, p) for p in ranges}
        beginnings = consumer.beginning_offsets(
            list(partitions.values()), timeout_ms=int(self.connect_timeout_s * 1000)
        )
        for tp, first in beginnings.items():
            if first > ranges[tp.partition][0]:
                raise K2Error(
                    f"Kafka no longer holds {topic}[{tp.partition}] offsets {ranges[tp.partition][0]}..{first - 1} "
                    "(retention deleted them before a micro-batch committed them to Iceberg), so the hybrid read "
                    "would have a gap; raise the topic's retention.ms, and set a new baseline with "
                    "`k2 offsets reset` after accepting the loss"
                )
        consumer.assign(list(partitions.values()))
        for partition, (start, _) in ranges.items():
            consumer.seek(partitions[partition], start)
        messages_read: dict[int, tuple[list[int], list[bytes | None]]] = {p: ([], []) for p in ranges}
        pending = set(ranges)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise KafkaUnavailableError(
                    f"read only part of the Kafka tail of {topic} (partitions {sorted(pending)}) within "
                    f"{self.timeout_s:.0f}s; is the broker at {self.kafka.servers} healthy?"
                )
            polling = time.perf_counter()
            polled = consumer.poll(timeout_ms=200, max_records=20_000)
            stats.poll_seconds += time.perf_counter() - polling
            for tp, messages in polled.items():
                start, end = ranges[tp.partition]
                offsets, values = messages_read[tp.partition]
                for message in messages:
                    if start <= message.offset < end:
                        offsets.append(message.offset)
                        values.append(message.value)
            for partition in list(pending):
                position = consumer.position(partitions[partition])
                if position is not None and position >= ranges[partition][1]:
                    pending.discard(partition)
                    consumer.pause(partitions[partition])
        consumer.resume(*partitions.values())
        return messages_read

    def close(self) -> None:
        with self._lock:
            self._drop_direct()
            self._drop_consumer()
            for partition in list(self._fetch_connections):
                self._drop_fetch_connection(partition)
            if self._fetch_pool is not None:
                self._fetch_pool.shutdown(wait=False)
                self._fetch_pool = None
            self._cache.clear()


def empty_trades() -> pa.Table:
    return TRADES.arrow_schema().empty_table()
