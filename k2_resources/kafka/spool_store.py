"""The spool on disk: one topic's append-only segments of framed records, and what Kafka acknowledged.

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

:class:`SpoolStore` is not thread-safe: its owner (:class:`~k2_resources.kafka.outbox.TopicOutbox`)
calls it under its own lock.
"""

from __future__ import annotations

import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SEGMENT_SUFFIX = ".seg"
ACKED_SUFFIX = ".acked"
DEFAULT_SEGMENT_RECORDS = 50_000
DEFAULT_FSYNC_INTERVAL_S = 1.0
_FRAME = struct.Struct(">II")  # body length, crc32(body)
_ACKED_PERSIST_INTERVAL_S = 0.5


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


def read_records(path: Path, offset: int, wanted: int, chunk_bytes: int = 1 << 20) -> tuple[list[SpoolRecord], int]:
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


@dataclass
class Segment:
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
class SpoolStats:
    """Counts since the TopicOutbox was made (the spool's own state survives restarts)."""

    sent_direct: int = 0
    spooled: int = 0
    replayed: int = 0
    acknowledged: int = 0
    failed: int = 0  # sends Kafka refused for good (not retriable); logged and reported
    segments_deleted: int = 0


class SpoolStore:
    """One topic's segments in ``directory``: appended to, sealed, acknowledged, deleted when done."""

    def __init__(
        self, directory: Path, topic: str, stats: SpoolStats, *, segment_records: int, fsync_interval_s: float
    ) -> None:
        self.directory = directory
        self.topic = topic
        self.stats = stats
        self.segment_records = segment_records
        self.fsync_interval_s = fsync_interval_s
        self.segments: list[Segment] = []
        self._head: Any = None  # the open file of the last, unsealed segment
        self._last_fsync = time.monotonic()

    def pending(self) -> int:
        """Records in the segments that Kafka has not acknowledged yet."""
        return sum(s.count - s.acked - len(s.acked_beyond) for s in self.segments)

    def open_existing(self) -> int:
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
            segment = Segment(path=path, first_seq=int(path.stem), count=len(records), sealed=True)
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
            self.segments.append(segment)
        for stale in self.directory.glob(f"*{ACKED_SUFFIX}"):
            if not stale.with_suffix(SEGMENT_SUFFIX).exists():
                stale.unlink()
        return next_seq

    def append(self, seq: int, record: SpoolRecord) -> bool:
        """Append ``record`` (sequence ``seq``); opens a new segment when there is none to append to
        or it is full. True when a segment was opened."""
        head = self.segments[-1] if self.segments and not self.segments[-1].sealed else None
        opened = False
        if head is None or head.count >= self.segment_records:
            if head is not None:
                self.seal(head)
            head = Segment(path=self.directory / f"{seq:020d}{SEGMENT_SUFFIX}", first_seq=seq)
            self.segments.append(head)
            self._head = head.path.open("ab")
            opened = True
        self._head.write(encode_record(record))
        self._head.flush()
        head.count += 1
        if self.fsync_interval_s <= 0 or time.monotonic() - self._last_fsync >= self.fsync_interval_s:
            os.fsync(self._head.fileno())
            self._last_fsync = time.monotonic()
        return opened

    def acknowledged(self, segment: Segment, index: int) -> None:
        """Record ``index`` of ``segment`` is settled; a sealed segment settled in full is deleted."""
        segment.acked_beyond.add(index)
        while segment.acked in segment.acked_beyond:
            segment.acked_beyond.discard(segment.acked)
            segment.acked += 1
        if segment.sealed and segment.acked >= segment.count:
            self.delete(segment)
        elif time.monotonic() - segment.persisted_at > _ACKED_PERSIST_INTERVAL_S:
            self.persist_acked(segment)

    def seal(self, segment: Segment) -> None:
        if segment.sealed:
            return
        segment.sealed = True
        self.close_head()
        if segment.acked >= segment.count:
            self.delete(segment)

    def close_head(self) -> None:
        if self._head is not None:
            self._head.flush()
            os.fsync(self._head.fileno())
            self._head.close()
            self._head = None
            self._last_fsync = time.monotonic()

    def delete(self, segment: Segment) -> None:
        if segment in self.segments:
            self.segments.remove(segment)
        segment.path.unlink(missing_ok=True)
        segment.acked_path.unlink(missing_ok=True)
        self.stats.segments_deleted += 1

    def persist_acked(self, segment: Segment) -> None:
        if segment.acked == segment.persisted_acked or not segment.path.exists():
            return
        temporary = segment.acked_path.with_suffix(".acked.tmp")
        temporary.write_text(str(segment.acked))
        temporary.replace(segment.acked_path)
        segment.persisted_acked = segment.acked
        segment.persisted_at = time.monotonic()

    def write_segment(self, first_seq: int, records: list[SpoolRecord]) -> None:
        """A sealed segment of ``records`` named by ``first_seq``, written and synced at once."""
        path = self.directory / f"{first_seq:020d}{SEGMENT_SUFFIX}"
        with path.open("wb") as handle:
            handle.write(b"".join(encode_record(record) for record in records))
            handle.flush()
            os.fsync(handle.fileno())
        self.segments.append(Segment(path=path, first_seq=first_seq, count=len(records), sealed=True))
        self.segments.sort(key=lambda s: s.first_seq)
