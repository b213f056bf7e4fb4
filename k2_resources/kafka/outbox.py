"""Log-before-publish for one Kafka topic: a bounded in-memory window, then an append-only spool.

``TopicOutbox`` sits between a producer of records (the Binance streamer) and a
``KafkaProducer``. It never drops a record while the broker is away:

1. While Kafka is reachable, a record goes straight to the producer and is kept in memory (the
   *window*) until the broker acknowledges it. The window is bounded by ``max_buffered``.
2. When the window is full (Kafka stopped acknowledging) or the producer cannot even take the
   record (no metadata within ``max_block_ms``), the record is appended to the spool
   (:mod:`k2_resources.kafka.spool_store`), and so is every later record, so nothing overtakes
   what is waiting on disk.
3. A replay thread (:mod:`k2_resources.kafka.spool_replay`) sends the spool to Kafka in order,
   from the oldest segment, never more than the window allows in flight. A segment is deleted
   only after the broker acknowledged every record in it. When the replay has sent the last
   spooled record, new records go straight to the producer again (they queue behind the
   replayed ones, so order holds).

This is the kdb+ tickerplant's idea of logging before publishing, applied where publishing can
fail: the log is what lets the publisher catch up after an outage, in order.

Delivery: exactly once per record while the process lives (the idempotent producer dedupes its
own retries, the spool deletes only acknowledged records). Across a crash or a shutdown while
Kafka is down, it is at least once: records Kafka acknowledged after the last ``.acked`` update
are sent again after a restart. Records still in the in-memory window at shutdown are written
to the spool (in their original order, ahead of later spooled records) before the process exits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from k2_resources.kafka.spool_replay import Entry, SpoolReplay
from k2_resources.kafka.spool_store import (
    DEFAULT_FSYNC_INTERVAL_S,
    DEFAULT_SEGMENT_RECORDS,
    SpoolRecord,
    SpoolStats,
    SpoolStore,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BUFFERED = 10_000
# Producer settings for a TopicOutbox: never expire a record while the broker is away (the
# window bounds what waits), and never block the caller for long when there is no metadata.
SPOOLING_PRODUCER_SETTINGS: dict[str, int] = {"max_block_ms": 2_000, "delivery_timeout_ms": 7 * 24 * 3600 * 1000}


class TopicOutbox(SpoolReplay):
    """Send records of one topic through ``producer`` without ever dropping one while Kafka is away.

    ``producer`` should be idempotent with a delivery timeout longer than any outage you expect
    and a short ``max_block_ms`` (``SPOOLING_PRODUCER_SETTINGS``): the window bounds what it holds.
    ``on_error`` is called with the exception of a record Kafka refused for good.
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
        self._inflight: OrderedDict[int, Entry] = OrderedDict()
        self._resend: list[Entry] = []
        # Direct records whose delivery timed out, held until no direct record is in flight, then
        # spooled together in the order they were sent (see _failed).
        self._expired: list[Entry] = []
        self._store = SpoolStore(
            self.directory, topic, self.stats, segment_records=segment_records, fsync_interval_s=fsync_interval_s
        )
        self._closing = False
        self._stopped = False
        self._abandoned = False
        self.directory.mkdir(parents=True, exist_ok=True)
        self._next_seq = self._store.open_existing()
        self._spooling = bool(self._store.segments)
        if self._spooling:
            log.warning(
                "%s: %d record(s) in the spool %s from an earlier run; replaying them before new ones",
                topic,
                sum(s.count - s.acked for s in self._store.segments),
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
            entry = Entry(seq, record)
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
            return self._store.pending()

    def _all_delivered(self) -> bool:
        """Under the lock: nothing in memory, nothing in the spool."""
        return (
            not self._inflight
            and not self._spooling
            and not self._resend
            and not self._expired
            and not self._store.segments
        )

    def drained(self) -> bool:
        """Nothing in memory, nothing in the spool: every record is in Kafka."""
        with self._lock:
            return self._all_delivered()

    def wait_drained(self, timeout_s: float) -> bool:
        """Wait until every record is acknowledged; False at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not self._all_delivered():
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
            self._store.close_head()
            for segment in self._store.segments:
                self._store.persist_acked(segment)
        return delivered

    # -- acknowledgements ---------------------------------------------------------------------

    def _watch(self, future: Any, entry: Entry) -> None:
        future.add_callback(lambda _metadata: self._acknowledged(entry))
        future.add_errback(lambda exc: self._failed(entry, exc))

    def _acknowledged(self, entry: Entry) -> None:
        with self._lock:
            if self._abandoned or self._inflight.pop(entry.seq, None) is None:
                return
            self.stats.acknowledged += 1
            if entry.segment is not None:
                self._store.acknowledged(entry.segment, entry.index)
            self._spool_expired_when_settled()
            self._lock.notify_all()

    def _failed(self, entry: Entry, exc: BaseException) -> None:
        with self._lock:
            if self._abandoned or self._inflight.pop(entry.seq, None) is None:
                return
            if not getattr(exc, "retriable", False):
                self.stats.failed += 1
                log.error("%s: Kafka refused a record for good (%s: %s)", self.topic, type(exc).__name__, exc)
                if entry.segment is not None:
                    self._store.acknowledged(entry.segment, entry.index)  # settled: nothing more can be done
            elif entry.segment is not None:
                log.warning("%s: a replayed record failed (%s); sending it again", self.topic, exc)
                self._resend.append(entry)
                self._resend.sort(key=lambda e: e.seq)
                self._spooling = True
            else:
                # Delivery timed out: keep it rather than lose it. Records sent directly after it may
                # still time out, and records handed over meanwhile go to the spool: so it waits until
                # no direct record is in flight, then all that timed out go into the spool in the order
                # they were sent, ahead of those later records (a record that times out can still land
                # after one of its partition that did not, which is why the delivery timeout is long).
                log.warning("%s: a record was not delivered in time (%s); spooling it", self.topic, exc)
                self._expired.append(entry)
                self._spooling = True
            self._spool_expired_when_settled()
            self._lock.notify_all()
        if not getattr(exc, "retriable", False) and self.on_error is not None:
            self.on_error(exc)

    # -- into the spool -----------------------------------------------------------------------

    def _append_to_spool(self, seq: int, record: SpoolRecord) -> None:
        """Under the lock: ``record`` into the spool; every later record follows it there."""
        if self._store.append(seq, record) and not self._spooling:
            log.warning("%s: Kafka is not acknowledging; spooling records to %s", self.topic, self.directory)
        self._spooling = True
        self.stats.spooled += 1
        self._lock.notify_all()

    def _spool_expired_when_settled(self) -> None:
        """Under the lock: once no direct record is in flight, the timed-out ones into the spool, in order."""
        if self._expired and not any(entry.segment is None for entry in self._inflight.values()):
            expired, self._expired = sorted(self._expired, key=lambda e: e.seq), []
            head = self._store.segments[-1] if self._store.segments else None
            if head is not None and not head.sealed:
                self._store.seal(head)  # later records go to a new segment, after the ones written here
            self._write_in_order(expired)

    def _keep_undelivered(self) -> None:
        """At a shutdown with Kafka away: write the in-memory window's direct records to the spool.

        They go into segments named by their own sequence numbers, so they replay before every
        later record; spooled records in flight are still in their segments past the acked mark.
        """
        with self._lock:
            self._abandoned = True
            direct = [entry for entry in self._inflight.values() if entry.segment is None] + self._expired
            self._inflight.clear()
            self._resend.clear()
            self._expired = []
            self._store.close_head()
            self._write_in_order(sorted(direct, key=lambda e: e.seq))
            if direct:
                log.warning(
                    "%s: Kafka did not acknowledge %d record(s) before shutdown; they are in the spool %s "
                    "and are sent first on the next start",
                    self.topic,
                    len(direct),
                    self.directory,
                )

    def _write_in_order(self, entries: list[Entry]) -> None:
        """Under the lock: direct ``entries`` (in seq order) into segments named by their own sequence
        numbers, so they replay before every later record."""
        run: list[Entry] = []
        spooled_seqs = sorted(s.first_seq for s in self._store.segments)
        for entry in entries:
            # start a new rescue segment whenever a spooled segment begins between two direct records
            if run and any(run[-1].seq < first < entry.seq for first in spooled_seqs):
                self._write_rescue(run)
                run = []
            run.append(entry)
        if run:
            self._write_rescue(run)

    def _write_rescue(self, entries: list[Entry]) -> None:
        self._store.write_segment(entries[0].seq, [entry.record for entry in entries])
        self.stats.spooled += len(entries)
