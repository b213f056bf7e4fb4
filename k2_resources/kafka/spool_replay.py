"""The replay of a topic's spool: spooled records sent to Kafka in order, within the window.

A replay thread sends the spool to Kafka in order, from the oldest segment, never more than the
window allows in flight (records sent again after a retriable failure first). When it has sent
the last spooled record, new records go straight to the producer again (they queue behind the
replayed ones, so order holds). :class:`SpoolReplay` is that half of
:class:`~k2_resources.kafka.outbox.TopicOutbox`; it shares the outbox's lock and window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kafka.errors import KafkaError

from k2_resources.kafka.spool_store import Segment, SpoolRecord, SpoolStats, SpoolStore, read_records

log = logging.getLogger(__name__)


@dataclass
class Entry:
    """A record handed to the producer and not acknowledged yet."""

    seq: int
    record: SpoolRecord
    segment: Segment | None = None  # None: sent directly, not from the spool
    index: int = -1  # its place in the segment


class SpoolReplay:
    """The replay thread's loop; the outbox that inherits it holds the state declared here."""

    producer: Any
    topic: str
    max_buffered: int
    retry_backoff_s: float
    stats: SpoolStats
    _lock: threading.Condition
    _inflight: OrderedDict[int, Entry]
    _resend: list[Entry]  # spooled records to send again before reading further
    _expired: list[Entry]  # direct records that timed out, not in the spool yet
    _store: SpoolStore
    _next_seq: int
    _spooling: bool
    _stopped: bool

    def _watch(self, future: Any, entry: Entry) -> None:
        """Settle ``entry`` when ``future`` does (the outbox's acknowledgements)."""
        raise NotImplementedError

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _next_batch(self) -> list[Entry]:
        """Under the lock: records to send now (resends first), as many as the window has room for."""
        room = self.max_buffered - len(self._inflight)
        batch: list[Entry] = []
        if self._expired:  # they go into the spool ahead of what it holds now: wait for them
            return batch
        while self._resend and room > 0:
            entry = self._resend.pop(0)
            batch.append(entry)
            room -= 1
        if self._resend:
            return batch
        for segment in self._store.segments:
            if room <= 0:
                break
            if segment.read_index >= segment.count:
                continue
            wanted = min(room, segment.count - segment.read_index)
            records, length = read_records(segment.path, segment.read_bytes, wanted)
            for record in records:
                batch.append(Entry(self._take_seq(), record, segment, segment.read_index))
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
            self._send_batch(batch)
            with self._lock:
                self._finish_replay_if_done()

    def _send_batch(self, batch: list[Entry]) -> None:
        """Hand ``batch`` to the producer; on a producer that cannot take records, put the unsent
        ones back in front of the resends and back off."""
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
                return
            with self._lock:
                self.stats.replayed += 1
            self._watch(future, entry)

    def _finish_replay_if_done(self) -> None:
        """Under the lock: once every spooled record is sent, new records go straight to Kafka again."""
        if not self._spooling or self._resend or self._expired:
            return
        if any(segment.read_index < segment.count for segment in self._store.segments):
            return
        self._spooling = False
        for segment in list(self._store.segments):
            self._store.seal(segment)
        log.info("%s: the spool is sent; records go straight to Kafka again", self.topic)
        self._lock.notify_all()
