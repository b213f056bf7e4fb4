"""The one dead-letter contract of K2's ``<topic>.dlq`` topics: value, headers, writer and reader.

Whoever gives up on a message (the Binance streamer on a WebSocket frame, the sink on a Kafka
record) writes ONE record with :func:`send_dead_letter`:

- value: the message exactly as it was received (a frame's UTF-8 bytes, a record's Avro bytes),
  or its first ``MAX_RAW_BYTES`` when it is longer, so the dead letter always fits in Kafka;
- headers (UTF-8 text), so a consumer can filter without parsing the value:

  ``k2.reason``            a short code: invalid_json, missing_field, schema_mismatch, too_large,
                           undecodable, unstorable, ...
  ``k2.detail``            why, for a person (at most 4096 characters)
  ``k2.stage``             who gave up: ``stream`` (the producer) or ``sink`` (the micro-batch)
  ``k2.source``            from where, for a person: ``binance``, or ``<topic>/<partition>@<offset>``
  ``k2.source-topic``, ``k2.source-partition``, ``k2.source-offset``   when the message had them
  ``k2.source-url``        the stream it came from, when it came from one
  ``k2.failed-at``         when, ISO-8601 UTC
  ``k2.raw-length``, ``k2.raw-sha256``   only when the value is truncated: the whole message's
                           length and SHA-256

:func:`read_dead_letter` decodes one record back into a :class:`DeadLetter`, this contract's and
the two shapes written before it (the streamer's JSON envelope, the sink's raw value with
``k2.reason``/``k2.source``/``k2.failed-at`` headers); :func:`read_dead_letters` reads a topic.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kafka import TopicPartition

STREAM = "stream"
SINK = "sink"
MAX_RAW_BYTES = 64 * 1024  # well under Kafka's 1 MB record limit, headers included
MAX_DETAIL_CHARS = 4096

Headers = list[tuple[str, bytes]]


@dataclass(frozen=True)
class DeadLetter:
    """One dead letter, as written and as read back."""

    raw: bytes  # the message as received, or its first MAX_RAW_BYTES when ``raw_length`` is set
    reason: str
    detail: str
    stage: str
    source: str
    failed_at: str
    source_topic: str | None = None
    source_partition: int | None = None
    source_offset: int | None = None
    source_url: str | None = None
    raw_length: int | None = None  # the whole message's length, when ``raw`` is truncated
    raw_sha256: str | None = None

    @property
    def truncated(self) -> bool:
        return self.raw_length is not None

    @property
    def text(self) -> str | None:
        """``raw`` as text when it is UTF-8 (a frame), else None (binary, such as Avro)."""
        try:
            return self.raw.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the raw message as ``raw`` (text) or ``raw_base64`` (binary)."""
        out: dict[str, Any] = {k: v for k, v in self.__dict__.items() if k != "raw" and v is not None}
        text = self.text
        if text is not None:
            out["raw"] = text
        else:
            out["raw_base64"] = base64.b64encode(self.raw).decode()
        return out


def dead_letter(
    raw: str | bytes | None,
    reason: str,
    detail: str,
    stage: str,
    *,
    source: str | None = None,
    topic: str | None = None,
    partition: int | None = None,
    offset: int | None = None,
    url: str | None = None,
) -> DeadLetter:
    """A dead letter for ``raw``, truncated to MAX_RAW_BYTES (with its length and SHA-256) if longer."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else (raw or b"")
    length = sha = None
    if len(data) > MAX_RAW_BYTES:
        length, sha = len(data), hashlib.sha256(data).hexdigest()
        data = data[:MAX_RAW_BYTES]
    if source is None:
        source = f"{topic}/{partition}@{offset}" if topic is not None else stage
    return DeadLetter(
        raw=data,
        reason=reason,
        detail=detail[:MAX_DETAIL_CHARS],
        stage=stage,
        source=source,
        failed_at=datetime.now(UTC).isoformat(),
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        source_url=url,
        raw_length=length,
        raw_sha256=sha,
    )


_OPTIONAL_HEADERS = {
    "k2.source-topic": "source_topic",
    "k2.source-partition": "source_partition",
    "k2.source-offset": "source_offset",
    "k2.source-url": "source_url",
    "k2.raw-length": "raw_length",
    "k2.raw-sha256": "raw_sha256",
}
_INTEGER_FIELDS = {"source_partition", "source_offset", "raw_length"}


def dead_letter_headers(letter: DeadLetter) -> Headers:
    """The Kafka headers of ``letter`` (see the module docstring)."""
    headers = [
        ("k2.reason", letter.reason),
        ("k2.detail", letter.detail),
        ("k2.stage", letter.stage),
        ("k2.source", letter.source),
        ("k2.failed-at", letter.failed_at),
    ]
    headers += [
        (name, str(getattr(letter, key))) for name, key in _OPTIONAL_HEADERS.items() if getattr(letter, key) is not None
    ]
    return [(name, value.encode("utf-8", "surrogatepass")) for name, value in headers]


def send_dead_letter(producer: Any, dlq_topic: str, letter: DeadLetter) -> Any:
    """Hand ``letter`` to ``producer`` (a KafkaProducer or K2's spooling producer) for ``dlq_topic``;
    the producer's future."""
    return producer.send(dlq_topic, value=letter.raw, headers=dead_letter_headers(letter))


def read_dead_letter(value: bytes | None, headers: Iterable[tuple[str, bytes | None]] | None) -> DeadLetter:
    """The dead letter a ``<topic>.dlq`` record holds: this contract's, or either earlier shape."""
    found = {name: (raw or b"").decode("utf-8", "replace") for name, raw in (headers or [])}
    value = value or b""
    if "k2.stage" in found:
        extra: dict[str, Any] = {}
        for name, key in _OPTIONAL_HEADERS.items():
            if name in found:
                extra[key] = int(found[name]) if key in _INTEGER_FIELDS else found[name]
        return DeadLetter(
            raw=value,
            reason=found.get("k2.reason", ""),
            detail=found.get("k2.detail", ""),
            stage=found["k2.stage"],
            source=found.get("k2.source", ""),
            failed_at=found.get("k2.failed-at", ""),
            **extra,
        )
    envelope = _streamer_envelope(value)
    if envelope is not None:
        return envelope
    return _sink_record(value, found)


def _streamer_envelope(value: bytes) -> DeadLetter | None:
    """The streamer's JSON envelope of before this contract, or None when ``value`` is not one."""
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or "reason" not in data or not ({"raw", "raw_base64"} & set(data)):
        return None
    raw = base64.b64decode(data["raw_base64"]) if "raw_base64" in data else str(data["raw"]).encode()
    return DeadLetter(
        raw=raw,
        reason=str(data["reason"]),
        detail=str(data.get("detail", "")),
        stage=STREAM,
        source=str(data.get("source", "")),
        failed_at=str(data.get("received_at", "")),
        source_url=data.get("url"),
        raw_length=data.get("raw_length"),
        raw_sha256=data.get("raw_sha256"),
    )


def _sink_record(value: bytes, found: dict[str, str]) -> DeadLetter:
    """The sink's raw record of before this contract: the reason text's first word is its code."""
    reason_text, source = found.get("k2.reason", ""), found.get("k2.source", "")
    topic = partition = offset = None
    if "@" in source and "/" in source:
        where, _, at = source.rpartition("@")
        topic_name, _, number = where.rpartition("/")
        if number.isdigit() and at.isdigit():
            topic, partition, offset = topic_name, int(number), int(at)
    return DeadLetter(
        raw=value,
        reason=reason_text.split(":", 1)[0].split(" ", 1)[0],
        detail=reason_text,
        stage=SINK,
        source=source,
        failed_at=found.get("k2.failed-at", ""),
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
    )


def read_dead_letters(
    kafka: Any, dlq_topic: str, limit: int | None = None, timeout_s: float = 60.0
) -> list[DeadLetter]:
    """The dead letters of ``dlq_topic`` (a KafkaResource's topic), oldest first per partition, up
    to the end offsets read now (at most ``limit``)."""
    ends = kafka.end_offsets(dlq_topic)
    partitions = [TopicPartition(dlq_topic, partition) for partition, end in ends.items() if end]
    letters: list[DeadLetter] = []
    if not partitions:
        return letters
    consumer = kafka.consumer(group_id=None)
    try:
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp.partition] for tp in partitions):
            if time.monotonic() > deadline or (limit is not None and len(letters) >= limit):
                break
            for records in consumer.poll(timeout_ms=500).values():
                letters += [read_dead_letter(r.value, r.headers) for r in records if r.offset < ends[r.partition]]
    finally:
        consumer.close()
    return letters if limit is None else letters[:limit]
