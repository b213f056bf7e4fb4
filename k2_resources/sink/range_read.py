"""Reading one offset range [start, end) of a Kafka partition, exactly, with no consumer group.

A range is fetched and its record batches parsed column-wise (``columnar_fetch``), and read with
kafka-python's consumer (assign + seek) whenever that path does not cover it. Offsets Kafka's
retention deleted before they were read are never skipped silently: they are returned as lost
ranges, or raise RetentionLossError where the caller cannot record them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from kafka import TopicPartition

from k2_resources.errors import K2Error
from k2_resources.kafka.columnar_fetch import FastFetchUnavailable, fetch_range
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.decode import BatchRead, decode_batch
from k2_resources.sink.errors import RetentionLossError
from k2_resources.sink.offsets import OffsetRange

log = logging.getLogger(__name__)


def read_range(
    kafka: KafkaResource, batch: OffsetRange, timeout_s: float = 120.0, *, consumer: Any = None
) -> BatchRead:
    """Every message of ``batch``, decoded; undecodable and unstorable ones kept apart with the reason.

    The range is fetched and parsed column-wise (``columnar_fetch``: no Python object per
    message, which is most of what kafka-python's own poll loop costs); whatever that path does
    not cover (another broker leads the partition, retention deleted offsets, compressed or
    transactional batches, ...) is read with kafka-python.
    ``consumer``: an open consumer for that path (a long-lived caller's); by default one is made
    for this range and closed.
    """
    if isinstance(kafka, KafkaResource) and batch.size:
        try:
            fetched_offsets, fetched_values = fetch_range(
                kafka.servers,
                f"{kafka.client_id}-sink",
                batch.topic,
                batch.partition,
                batch.start,
                batch.end,
                timeout_s,
            )
            return decode_batch(fetched_offsets, fetched_values)
        except FastFetchUnavailable as exc:  # kafka-python's general path reads it exactly
            log.info("%s: reading with kafka-python (%s)", batch.key, exc)
    offsets: list[int] = []
    values: list[bytes | None] = []
    lost: list[tuple[int, int]] = []
    for messages in _message_batches(kafka, batch, timeout_s, lost, consumer):
        offsets += [message.offset for message in messages]
        values += [message.value for message in messages]
    result = decode_batch(offsets, values)
    result.lost = lost
    return result


RAW_SCHEMA = pa.schema(
    [
        pa.field("offset", pa.int64(), nullable=False),
        pa.field("timestamp_ms", pa.int64()),
        pa.field("key", pa.binary()),
        pa.field("value", pa.binary()),
    ]
)


def read_raw_range(
    kafka: KafkaResource, batch: OffsetRange, timeout_s: float = 120.0, lost: list[tuple[int, int]] | None = None
) -> pa.Table:
    """The messages of ``batch`` as they are in Kafka (offset, timestamp, key, value), not decoded.

    Offsets Kafka already deleted are appended to ``lost``; without a list to record them in,
    such a loss raises RetentionLossError.
    """
    offsets, stamps, keys, values = [], [], [], []
    for messages in _message_batches(kafka, batch, timeout_s, lost):
        offsets += [message.offset for message in messages]
        stamps += [message.timestamp for message in messages]
        keys += [message.key for message in messages]
        values += [message.value for message in messages]
    return pa.table({"offset": offsets, "timestamp_ms": stamps, "key": keys, "value": values}, schema=RAW_SCHEMA)


def decode_raw(raw: pa.Table) -> BatchRead:
    """Decode a raw batch (``read_raw_range`` / a spill file) like ``read_range`` would."""
    return decode_batch(raw.column("offset").combine_chunks(), raw.column("value").combine_chunks())


def _note_loss(lost: list[tuple[int, int]] | None, batch: OffsetRange, start: int, end: int) -> None:
    if lost is None:
        raise RetentionLossError(
            f"{batch.key}: offsets [{start}, {end}) of {batch.topic}[{batch.partition}] were deleted by Kafka "
            "retention before they were read; run the micro-batch (it records the loss) and see "
            "`k2 offsets show`"
        )
    if lost and lost[-1][1] == start:
        lost[-1] = (lost[-1][0], end)
    else:
        lost.append((start, end))
    log.warning("%s: offsets [%d, %d) were deleted by Kafka retention before they were read", batch.key, start, end)


def _message_batches(
    kafka: KafkaResource,
    batch: OffsetRange,
    timeout_s: float,
    lost: list[tuple[int, int]] | None = None,
    consumer: Any = None,
) -> Iterator[list[Any]]:
    """The Kafka messages of ``batch`` in offset order (assign + seek, no consumer group), a list per poll.

    Offsets below the partition's log start (deleted by retention) are never skipped silently:
    they are appended to ``lost`` ([start, end) ranges), or raise RetentionLossError without it.
    ``consumer``: an open consumer to use (left open); by default one is made and closed.
    """
    if batch.size == 0:
        return
    owned = consumer is None
    if owned:
        consumer = kafka.consumer(group_id=None)
    partition = TopicPartition(batch.topic, batch.partition)
    try:
        consumer.assign([partition])
        expected = batch.start
        log_start = consumer.beginning_offsets([partition])[partition]
        if log_start > expected:
            _note_loss(lost, batch, expected, min(log_start, batch.end))
            expected = min(log_start, batch.end)
            if expected >= batch.end:
                return
        consumer.seek(partition, expected)
        deadline = time.monotonic() + timeout_s
        while expected < batch.end:
            if time.monotonic() > deadline:
                raise K2Error(
                    f"read only {expected - batch.start} of {batch.size} messages of {batch.key} within "
                    f"{timeout_s:.0f}s; is the broker at {kafka.servers} healthy and the range still retained?"
                )
            polled = consumer.poll(timeout_ms=500).get(partition, [])
            # The usual case: the poll continues exactly where the last one ended, with no gap
            # (offsets only grow within a partition, so the two ends tell).
            wanted = min(len(polled), batch.end - expected)
            if wanted and polled[0].offset == expected and polled[wanted - 1].offset == expected + wanted - 1:
                expected += wanted
                yield polled if wanted == len(polled) else polled[:wanted]
                polled = polled[wanted:]
            taken = []
            for message in polled:
                if message.offset < expected:
                    continue  # a re-delivered offset
                if message.offset > expected:
                    # Offsets can skip (compacted topics, transaction markers), or retention deleted
                    # them while we read (the consumer then resets to the log start): tell the two apart.
                    log_start = consumer.beginning_offsets([partition])[partition]
                    if log_start > expected:
                        _note_loss(lost, batch, expected, min(log_start, message.offset, batch.end))
                if message.offset >= batch.end:
                    break
                # Take what exists below end.
                expected = message.offset + 1
                taken.append(message)
            if taken:
                yield taken
            position = consumer.position(partition)
            if position is not None and position >= batch.end:
                break
    finally:
        if owned:
            consumer.close()
