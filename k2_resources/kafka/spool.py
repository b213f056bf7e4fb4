"""Log-before-publish for one Kafka topic: a bounded in-memory window, then an append-only spool.

``SpooledProducer`` sits between a producer of records (the Binance streamer) and a
``KafkaProducer``. It never drops a record while the broker is away:

1. While Kafka is reachable, a record goes straight to the producer and is kept in memory (the
   *window*) until the broker acknowledges it. The window is bounded by ``max_buffered``.
2. When the window is full (Kafka stopped acknowledging) or the producer cannot even take the
   record (no metadata within ``max_block_ms``), the record is appended to the spool, and so is
   every later record, so nothing overtakes what is waiting on disk.
3. A replay thread sends the spool to Kafka in order, from the oldest segment, never more than
   the window allows in flight. A segment is deleted only after the broker acknowledged every
   record in it. When the replay has sent the last spooled record, new records go straight to
   the producer again (they queue behind the replayed ones, so order holds).

This is the kdb+ tickerplant's idea of logging before publishing, applied where publishing can
fail: the log is what lets the publisher catch up after an outage, in order.

On disk (``<spool dir>/<topic>/``): segments ``<first sequence, 20 digits>.seg``, replayed in
name order. A record is ``>II`` (body length, CRC-32 of the body) then the body: ``>i`` key
length (-1: no key), the key, ``>H`` header count, each header as ``>H`` name length, name,
``>I`` value length, value, and the record value to the end of the body. A torn last record (a
crash mid-write) fails its length or CRC check and is cut off when the spool is opened. Beside a
segment being replayed, ``<segment>.acked`` holds how many of its first records Kafka
acknowledged, so a restart resumes there.

Durability policy (fsync): every record is written to the OS with one ``write`` and a flush, so a
killed streamer loses nothing that reached the spool; ``fsync`` runs when a segment is sealed,
on close, and at most every ``fsync_interval_s`` (1 s by default) while spooling, so a power
loss costs at most about that much of the spool. ``fsync_interval_s=0`` syncs every record.

Delivery: exactly once per record while the process lives (the idempotent producer dedupes its
own retries, the spool deletes only acknowledged records). Across a crash or a shutdown while
Kafka is down, it is at least once: records Kafka acknowledged after the last ``.acked`` update
are sent again after a restart. Records still in the in-memory window at shutdown are written
to the spool (in their original order, ahead of later spooled records) before the process exits.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError, KafkaTimeoutError

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
ACKED_SUFFIX = ".acked"
DEFAULT_MAX_BUFFERED = 10_000
DEFAULT_SEGMENT_RECORDS = 50_000
DEFAULT_FSYNC_INTERVAL_S = 1.0
_FRAME = struct.Struct(">II")  # body length, crc32(body)
_ACKED_PERSIST_INTERVAL_S = 0.5
# Producer settings for a SpooledProducer: never expire a record while the broker is away (the
# window bounds what waits), and never block the caller for long when there is no metadata.
SPOOLING_PRODUCER_SETTINGS: dict[str, int] = {"max_block_ms": 2_000, "delivery_timeout_ms": 7 * 24 * 3600 * 1000}


@dataclass(frozen=True)
class SpoolRecord:
    """One Kafka record as the spool keeps it (the topic is the spool's)."""

    value: bytes
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def encode_record(record: SpoolRecord) -> bytes:
    """The record with its length and CRC framing, ready to append."""
    parts = [
        struct.pack(">i", -1 if record.key is None else len(record.key)),
        record.key or b"",
        struct.pack(">H", len(record.headers)),
    ]
    for name, value in record.headers:
        encoded = name.encode()
        parts += [struct.pack(">H", len(encoded)), encoded, struct.pack(">I", len(value)), value]
    parts.append(record.value)
    body = b"".join(parts)
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


def decode_records(data: bytes, limit: int | None = None) -> tuple[list[SpoolRecord], int]:
    """The whole records at the start of ``data`` (at most ``limit``) and the byte length they take;
    a torn or corrupt tail is left out."""
    records: list[SpoolRecord] = []
    position = 0
    while position + _FRAME.size <= len(data) and (limit is None or len(records) < limit):
        length, crc = _FRAME.unpack_from(data, position)
        body = data[position + _FRAME.size : position + _FRAME.size + length]
        if len(body) < length or zlib.crc32(body) != crc:
            break
        records.append(_decode_body(body))
        position += _FRAME.size + length
    return records, position


def _decode_body(body: bytes) -> SpoolRecord:
    (key_length,) = struct.unpack_from(">i", body, 0)
    at = 4
    key = None if key_length < 0 else body[at : at + key_length]
    at += max(key_length, 0)
    (count,) = struct.unpack_from(">H", body, at)
    at += 2
    headers = []
    for _ in range(count):
        (name_length,) = struct.unpack_from(">H", body, at)
        name = body[at + 2 : at + 2 + name_length].decode()
        at += 2 + name_length
        (value_length,) = struct.unpack_from(">I", body, at)
        headers.append((name, body[at + 4 : at + 4 + value_length]))
        at += 4 + value_length
    return SpoolRecord(value=body[at:], key=key, headers=tuple(headers))


@dataclass
class _Segment:
    """One segment file: how many records it holds and how many of the first ones Kafka acknowledged."""

    path: Path
    first_seq: int
    count: int = 0
    acked: int = 0  # a prefix: records [0, acked) are acknowledged
    acked_beyond: set[int] = field(default_factory=set)  # acknowledged indexes past the prefix
    read_index: int = 0  # the replay's cursor: the next record to send
    read_bytes: int = 0  # ... and its byte position
    persisted_acked: int = 0
    persisted_at: float = 0.0
    sealed: bool = False  # no more appends

    @property
    def acked_path(self) -> Path:
        return self.path.with_suffix(ACKED_SUFFIX)


@dataclass
class _Entry:
    """A record handed to the producer and not acknowledged yet."""

    seq: int
    record: SpoolRecord
    segment: _Segment | None = None  # None: sent directly, not from the spool
    index: int = -1  # its place in the segment


@dataclass
class SpoolStats:
    """Counts since the SpooledProducer was made (the spool's own state survives restarts)."""

    sent_direct: int = 0
    spooled: int = 0
    replayed: int = 0
    acknowledged: int = 0
    failed: int = 0  # sends Kafka refused for good (not retriable); logged and reported
    segments_deleted: int = 0


class SpooledProducer:
    """Send records of one topic through ``producer`` without ever dropping one while Kafka is away.

    ``producer`` should be idempotent with a delivery timeout longer than any outage you expect
    and a short ``max_block_ms`` (``SPOOLING_PRODUCER_SETTINGS``): the window bounds what it holds. ``on_error`` is called with the exception of a record Kafka refused for good.
    """

    def __init__(
        self,
        producer: Any,
        topic: str,
        directory: Path,
        *,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        segment_records: int = DEFAULT_SEGMENT_RECORDS,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        on_error: Callable[[BaseException], None] | None = None,
        retry_backoff_s: float = 0.5,
    ) -> None:
        if max_buffered < 1:
            raise ValueError("max_buffered must be at least 1")
        self.producer = producer
        self.topic = topic
        self.directory = Path(directory)
        self.max_buffered = max_buffered
        self.segment_records = segment_records
        self.fsync_interval_s = fsync_interval_s
        self.on_error = on_error
        self.retry_backoff_s = retry_backoff_s
        self.stats = SpoolStats()
        self._lock = threading.Condition()
        self._inflight: OrderedDict[int, _Entry] = OrderedDict()
        self._resend: list[_Entry] = []  # spooled records to send again before reading further
        self._segments: list[_Segment] = []
        self._head: Any = None  # the open file of the last, unsealed segment
        self._last_fsync = time.monotonic()
        self._closing = False
        self._stopped = False
        self._abandoned = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._next_seq = self._open_existing()
        self._spooling = bool(self._segments)
        if self._spooling:
            pending = sum(s.count - s.acked for s in self._segments)
            log.warning(
                "%s: %d record(s) in the spool %s from an earlier run; replaying them before new ones",
                topic,
                pending,
                self.directory,
            )
        self._replayer = threading.Thread(target=self._replay_loop, name=f"spool-replay-{topic}", daemon=True)
        self._replayer.start()

    # -- what the streamer calls --------------------------------------------------------------

    def send(self, value: bytes, key: bytes | None = None, headers: list[tuple[str, bytes]] | None = None) -> None:
        """Hand one record over: to Kafka now, or to the spool when Kafka is not keeping up."""
        record = SpoolRecord(value=value, key=key, headers=tuple(headers or ()))
        with self._lock:
            if self._closing:
                raise RuntimeError(f"the spooled producer of {self.topic} is closed")
            seq = self._take_seq()
            if self._spooling or len(self._inflight) >= self.max_buffered:
                self._append_to_spool(seq, record)
                return
            entry = _Entry(seq, record)
            self._inflight[seq] = entry
        try:
            future = self.producer.send(self.topic, key=record.key, value=record.value, headers=list(record.headers))
        except KafkaError as exc:  # no metadata within max_block_ms: Kafka is away
            log.warning("%s: Kafka cannot take records (%s); spooling to %s", self.topic, exc, self.directory)
            with self._lock:
                self._inflight.pop(seq, None)
                self._append_to_spool(seq, record)
            return
        with self._lock:
            self.stats.sent_direct += 1
        self._watch(future, entry)

    @property
    def spooling(self) -> bool:
        """True while records wait in the spool."""
        with self._lock:
            return self._spooling

    def buffered(self) -> int:
        """Records handed to the producer and not acknowledged yet (the in-memory window)."""
        with self._lock:
            return len(self._inflight)

    def spool_pending(self) -> int:
        """Records in the spool that Kafka has not acknowledged yet."""
        with self._lock:
            return sum(s.count - s.acked - len(s.acked_beyond) for s in self._segments)

    def drained(self) -> bool:
        """Nothing in memory, nothing in the spool: every record is in Kafka."""
        with self._lock:
            return not self._inflight and not self._spooling and not self._resend and not self._segments

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until every record is acknowledged; False at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not (not self._inflight and not self._spooling and not self._resend and not self._segments):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
            return True

    def close(self, timeout_s: float = 30.0) -> bool:
        """Wait up to ``timeout_s`` for Kafka to acknowledge everything, then stop the replay.

        What is still unacknowledged stays in (or is written to) the spool, in order, for the next
        run. Returns True when everything was delivered. Does not close the producer.
        """
        with self._lock:
            self._closing = True
        delivered = self.wait_drained(timeout_s)
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        self._replayer.join(timeout=max(timeout_s, 5.0))
        if not delivered:
            self._keep_undelivered()
        with self._lock:
            self._close_head()
            for segment in self._segments:
                self._persist_acked(segment)
        return delivered

    # -- acknowledgements ---------------------------------------------------------------------

    def _watch(self, future: Any, entry: _Entry) -> None:
        future.add_callback(lambda _metadata: self._acknowledged(entry))
        future.add_errback(lambda exc: self._failed(entry, exc))

    def _acknowledged(self, entry: _Entry) -> None:
        with self._lock:
            if self._abandoned or self._inflight.pop(entry.seq, None) is None:
                return
            self.stats.acknowledged += 1
            if entry.segment is not None:
                self._segment_acked(entry.segment, entry.index)
            self._lock.notify_all()

    def _failed(self, entry: _Entry, exc: BaseException) -> None:
        with self._lock:
            if self._abandoned or self._inflight.pop(entry.seq, None) is None:
                return
            if not getattr(exc, "retriable", False):
                self.stats.failed += 1
                log.error("%s: Kafka refused a record for good (%s: %s)", self.topic, type(exc).__name__, exc)
                if entry.segment is not None:
                    self._segment_acked(entry.segment, entry.index)  # settled: nothing more can be done with it
            elif entry.segment is not None:
                log.warning("%s: a replayed record failed (%s); sending it again", self.topic, exc)
                self._resend.append(entry)
                self._resend.sort(key=lambda e: e.seq)
                self._spooling = True
            else:
                # Delivery timed out: keep it in the spool rather than lose it (it may land after
                # records sent later, which is why the producer's delivery timeout should be long).
                log.warning("%s: a record was not delivered in time (%s); spooling it", self.topic, exc)
                self._append_to_spool(self._take_seq(), entry.record)
            self._lock.notify_all()
        if not getattr(exc, "retriable", False) and self.on_error is not None:
            self.on_error(exc)

    def _segment_acked(self, segment: _Segment, index: int) -> None:
        segment.acked_beyond.add(index)
        while segment.acked in segment.acked_beyond:
            segment.acked_beyond.discard(segment.acked)
            segment.acked += 1
        if segment.sealed and segment.acked >= segment.count:
            self._delete(segment)
        elif time.monotonic() - segment.persisted_at > _ACKED_PERSIST_INTERVAL_S:
            self._persist_acked(segment)

    # -- the spool on disk --------------------------------------------------------------------

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _open_existing(self) -> int:
        """Load the segments an earlier run left (cutting torn tails); returns the next sequence number."""
        next_seq = 0
        for path in sorted(self.directory.glob(f"*{SEGMENT_SUFFIX}")):
            data = path.read_bytes()
            records, length = decode_records(data)
            if length < len(data):
                log.warning(
                    "%s: cutting a torn record (%d bytes) off the end of %s", self.topic, len(data) - length, path
                )
                with path.open("r+b") as handle:
                    handle.truncate(length)
            segment = _Segment(path=path, first_seq=int(path.stem), count=len(records), sealed=True)
            try:
                segment.acked = min(int(segment.acked_path.read_text().strip() or 0), segment.count)
            except (FileNotFoundError, ValueError):
                segment.acked = 0
            segment.persisted_acked = segment.acked
            segment.read_index = segment.acked
            segment.read_bytes = _byte_offset(data, segment.acked)
            next_seq = max(next_seq, segment.first_seq + max(segment.count, 1))
            if segment.acked >= segment.count:
                path.unlink()
                segment.acked_path.unlink(missing_ok=True)
                continue
            self._segments.append(segment)
        for stale in self.directory.glob(f"*{ACKED_SUFFIX}"):
            if not stale.with_suffix(SEGMENT_SUFFIX).exists():
                stale.unlink()
        return next_seq

    def _append_to_spool(self, seq: int, record: SpoolRecord) -> None:
        """Append under the lock; opens a new segment when there is none to append to or it is full."""
        head = self._segments[-1] if self._segments and not self._segments[-1].sealed else None
        if head is None or head.count >= self.segment_records:
            if head is not None:
                self._seal(head)
            head = _Segment(path=self.directory / f"{seq:020d}{SEGMENT_SUFFIX}", first_seq=seq)
            self._segments.append(head)
            self._head = head.path.open("ab")
            if not self._spooling:
                log.warning("%s: Kafka is not acknowledging; spooling records to %s", self.topic, self.directory)
        self._head.write(encode_record(record))
        self._head.flush()
        head.count += 1
        self._spooling = True
        self.stats.spooled += 1
        if self.fsync_interval_s <= 0 or time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._head.fileno())
            self._last_fsync = time.monotonic()
        self._lock.notify_all()

    def _seal(self, segment: _Segment) -> None:
        if segment.sealed:
            return
        segment.sealed = True
        self._close_head()
        if segment.acked >= segment.count:
            self._delete(segment)

    def _close_head(self) -> None:
        if self._head is not None:
            self._head.flush()
            os.fsync(self._head.fileno())
            self._head.close()
            self._head = None
            self._last_fsync = time.monotonic()

    def _delete(self, segment: _Segment) -> None:
        if segment in self._segments:
            self._segments.remove(segment)
        segment.path.unlink(missing_ok=True)
        segment.acked_path.unlink(missing_ok=True)
        self.stats.segments_deleted += 1

    def _persist_acked(self, segment: _Segment) -> None:
        if segment.acked == segment.persisted_acked or not segment.path.exists():
            return
        temporary = segment.acked_path.with_suffix(".acked.tmp")
        temporary.write_text(str(segment.acked))
        temporary.replace(segment.acked_path)
        segment.persisted_acked = segment.acked
        segment.persisted_at = time.monotonic()

    def _keep_undelivered(self) -> None:
        """At a shutdown with Kafka away: write the in-memory window's direct records to the spool.

        They go into segments named by their own sequence numbers, so they replay before every
        later record; spooled records in flight are still in their segments past the acked mark.
        """
        with self._lock:
            self._abandoned = True
            direct = [entry for entry in self._inflight.values() if entry.segment is None]
            self._inflight.clear()
            self._resend.clear()
            self._close_head()
            run: list[_Entry] = []
            spooled_seqs = sorted(s.first_seq for s in self._segments)
            for entry in sorted(direct, key=lambda e: e.seq):
                # start a new rescue segment whenever a spooled segment begins between two direct records
                if run and any(run[-1].seq < first < entry.seq for first in spooled_seqs):
                    self._write_rescue(run)
                    run = []
                run.append(entry)
            if run:
                self._write_rescue(run)
            if direct:
                log.warning(
                    "%s: Kafka did not acknowledge %d record(s) before shutdown; they are in the spool %s "
                    "and are sent first on the next start",
                    self.topic,
                    len(direct),
                    self.directory,
                )

    def _write_rescue(self, entries: list[_Entry]) -> None:
        path = self.directory / f"{entries[0].seq:020d}{SEGMENT_SUFFIX}"
        with path.open("wb") as handle:
            handle.write(b"".join(encode_record(entry.record) for entry in entries))
            handle.flush()
            os.fsync(handle.fileno())
        self._segments.append(_Segment(path=path, first_seq=entries[0].seq, count=len(entries), sealed=True))
        self._segments.sort(key=lambda s: s.first_seq)
        self.stats.spooled += len(entries)

    # -- the replay ---------------------------------------------------------------------------

    def _next_batch(self) -> list[_Entry]:
        """Under the lock: records to send now (resends first), as many as the window has room for."""
        room = self.max_buffered - len(self._inflight)
        batch: list[_Entry] = []
        while self._resend and room > 0:
            entry = self._resend.pop(0)
            batch.append(entry)
            room -= 1
        if self._resend:
            return batch
        for segment in self._segments:
            if room <= 0:
                break
            if segment.read_index >= segment.count:
                continue
            wanted = min(room, segment.count - segment.read_index)
            records, length = _read_records(segment.path, segment.read_bytes, wanted)
            for record in records:
                batch.append(_Entry(self._take_seq(), record, segment, segment.read_index))
                segment.read_index += 1
            segment.read_bytes += length
            room -= len(records)
        return batch

    def _replay_loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopped and not (self._spooling and len(self._inflight) < self.max_buffered):
                    self._lock.wait(0.5)
                if self._stopped:
                    return
                batch = self._next_batch()
                for entry in batch:
                    self._inflight[entry.seq] = entry
                if not batch:
                    self._finish_replay_if_done()
                    self._lock.wait(0.1)
                    continue
            for position, entry in enumerate(batch):
                try:
                    future = self.producer.send(
                        self.topic, key=entry.record.key, value=entry.record.value, headers=list(entry.record.headers)
                    )
                except KafkaError as exc:
                    with self._lock:
                        unsent = batch[position:]
                        for left in unsent:
                            self._inflight.pop(left.seq, None)
                        self._resend = sorted(unsent + self._resend, key=lambda e: e.seq)
                    log.info("%s: Kafka still cannot take records (%s); retrying the spool", self.topic, exc)
                    time.sleep(self.retry_backoff_s)
                    break
                with self._lock:
                    self.stats.replayed += 1
                self._watch(future, entry)
            with self._lock:
                self._finish_replay_if_done()

    def _finish_replay_if_done(self) -> None:
        """Under the lock: once every spooled record is sent, new records go straight to Kafka again."""
        if not self._spooling or self._resend:
            return
        if any(segment.read_index < segment.count for segment in self._segments):
            return
        self._spooling = False
        for segment in list(self._segments):
            self._seal(segment)
        log.info("%s: the spool is sent; records go straight to Kafka again", self.topic)
        self._lock.notify_all()


def _read_records(path: Path, offset: int, wanted: int, chunk_bytes: int = 1 << 20) -> tuple[list[SpoolRecord], int]:
    """Up to ``wanted`` whole records of ``path`` from byte ``offset``, read in bounded chunks."""
    records: list[SpoolRecord] = []
    consumed = 0
    with path.open("rb") as handle:
        handle.seek(offset)
        pending = b""
        while len(records) < wanted:
            chunk = handle.read(chunk_bytes)
            if not chunk:
                break
            pending += chunk
            more, length = decode_records(pending, wanted - len(records))
            records += more
            consumed += length
            pending = pending[length:]
    return records, consumed


def _byte_offset(data: bytes, records: int) -> int:
    """The byte position after the first ``records`` framed records of ``data``."""
    position = 0
    for _ in range(records):
        length, _crc = _FRAME.unpack_from(data, position)
        position += _FRAME.size + length
    return position


class _Accepted:
    """What ``SpoolingProducer.send`` returns: the record is taken (in memory or in the spool).

    It looks enough like kafka-python's future for callers that check ``is_done``/``failed()`` and
    add an errback: errbacks are kept per topic and called for records Kafka refuses for good.
    """

    is_done = True

    def __init__(self, owner: SpoolingProducer, topic: str) -> None:
        self._owner, self._topic = owner, topic

    def failed(self) -> bool:
        return False

    def succeeded(self) -> bool:
        return True

    def add_errback(self, handler: Callable[[BaseException], Any], *args: Any, **kwargs: Any) -> _Accepted:
        self._owner._add_error_handler(handler)
        return self

    def add_callback(self, handler: Callable[..., Any], *args: Any, **kwargs: Any) -> _Accepted:
        return self


class SpoolingProducer:
    """A stand-in for a KafkaProducer that sends every topic through a SpooledProducer of its own.

    ``send(topic, value, key, headers)`` never blocks for long and never loses a record; ``flush``
    waits at most ``close_timeout_s`` for Kafka; ``close`` leaves what Kafka did not take in the
    spool (``<root>/<topic>/``) for the next run, then closes the underlying producer.
    """

    def __init__(
        self,
        producer: Any,
        root: Path,
        *,
        max_buffered: int = DEFAULT_MAX_BUFFERED,
        close_timeout_s: float = 10.0,
        on_spooled: Callable[[str, int], None] | None = None,
        topics: tuple[str, ...] = (),
        **options: Any,
    ) -> None:
        self.producer = producer
        self.root = Path(root)
        self.max_buffered = max_buffered
        self.close_timeout_s = close_timeout_s
        self.on_spooled = on_spooled
        self.options = options
        self.outboxes: dict[str, SpooledProducer] = {}
        self.undelivered = 0
        self._give_up_at: float | None = None
        self._handlers: list[Callable[[BaseException], Any]] = []
        self._lock = threading.Lock()
        for topic in topics:  # opened now, so a spool left by an earlier run is replayed at once
            self.outbox(topic)

    def outbox(self, topic: str) -> SpooledProducer:
        """The topic's spooled producer (opened, and its leftover spool replayed, on first use)."""
        with self._lock:
            if topic not in self.outboxes:
                self.outboxes[topic] = SpooledProducer(
                    self.producer,
                    topic,
                    self.root / topic,
                    max_buffered=self.max_buffered,
                    on_error=self._report,
                    **self.options,
                )
            return self.outboxes[topic]

    def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        **_: Any,
    ) -> _Accepted:
        outbox = self.outbox(topic)
        before = outbox.stats.spooled
        outbox.send(value or b"", key=key, headers=headers)
        if self.on_spooled is not None and outbox.stats.spooled != before:
            self.on_spooled(topic, outbox.stats.spooled - before)
        return _Accepted(self, topic)

    def buffered(self) -> int:
        return sum(outbox.buffered() for outbox in list(self.outboxes.values()))

    def spool_pending(self) -> int:
        return sum(outbox.spool_pending() for outbox in list(self.outboxes.values()))

    def totals(self) -> SpoolStats:
        """The stats of every topic added up."""
        total = SpoolStats()
        for outbox in list(self.outboxes.values()):
            for name in vars(total):
                setattr(total, name, getattr(total, name) + getattr(outbox.stats, name))
        return total

    def flush(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` or close_timeout_s) until Kafka acknowledged every record."""
        deadline = self._deadline(timeout)
        return all(
            outbox.wait_drained(max(0.0, deadline - time.monotonic())) for outbox in list(self.outboxes.values())
        )

    def close(self, timeout: float | None = None) -> bool:
        """Stop the replays, keep what Kafka did not take in the spool, close the producer; True if all was delivered."""
        deadline = self._deadline(timeout)
        delivered = True
        for topic, outbox in list(self.outboxes.items()):
            if not outbox.close(timeout_s=max(0.0, deadline - time.monotonic())):
                delivered = False
                pending = outbox.spool_pending()
                self.undelivered += pending
                log.warning(
                    "Kafka did not take every record of %s in time; %d wait in %s for the next run",
                    topic,
                    pending,
                    outbox.directory,
                )
        try:
            self.producer.close(timeout=None if delivered else 0)
        except KafkaTimeoutError:
            # kafka-python's close flushes before it forces the sender down, and raises when that
            # flush times out. What Kafka did not take is in the spool already: stop the sender.
            sender = getattr(self.producer, "_sender", None)
            if sender is not None and sender.is_alive():
                sender.force_close()
            delivered = False
        return delivered

    def _deadline(self, timeout: float | None) -> float:
        """One close_timeout_s for a flush and the close after it together (the end of a run)."""
        if timeout is not None:
            return time.monotonic() + timeout
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self.close_timeout_s
        return self._give_up_at

    def _add_error_handler(self, handler: Callable[[BaseException], Any]) -> None:
        with self._lock:
            if handler not in self._handlers:
                self._handlers.append(handler)

    def _report(self, exc: BaseException) -> None:
        for handler in list(self._handlers):
            handler(exc)
