"""Exactly-once micro-batches from a Kafka partition into ``market.trades``.

A micro-batch is a fixed offset range [start, end) of one partition. It is read with
assign + seek (no consumer-group rebalancing), decoded, and appended in ONE Iceberg commit
whose snapshot summary records the range. Before writing, and again on every commit retry,
the table's committed offsets decide:

- ``committed >= end``: the range is already in the table -> nothing is written;
- ``committed == start``: the range is next -> append it;
- anything else: a gap or an overlap -> refuse with an error naming both ranges.

So a re-run of a committed range writes nothing, and a run killed at any point (before or
after its Iceberg commit) is repaired by running the same range again.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

import pyarrow as pa
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from pyiceberg.exceptions import CommitFailedException

from k2_resources.errors import K2Error, SchemaMismatchError
from k2_resources.iceberg import IcebergResource, to_arrow
from k2_resources.kafka import KafkaResource
from k2_resources.schemas import decode_trade
from k2_resources.tables import TRADES
from k2_resources.trades.offsets import OffsetRange, commit_properties, committed_offsets

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "market.trades.binance"
CONSUMER_GROUP = "k2-iceberg-sink"


class OffsetGapError(K2Error):
    """A micro-batch does not start where the table's committed offsets end."""


@dataclass
class BatchRead:
    """What was read from one offset range."""

    records: list[dict] = field(default_factory=list)
    dead_letters: list[tuple[int, bytes, str]] = field(default_factory=list)  # (offset, raw, reason)
    last_offset_seen: int = -1


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one micro-batch."""

    batch: OffsetRange
    written: int
    dead_lettered: int
    already_committed: bool
    snapshot_id: int | None
    commit_seconds: float


def dead_letter_topic(topic: str) -> str:
    return f"{topic}.dlq"


def read_range(kafka: KafkaResource, batch: OffsetRange, timeout_s: float = 120.0) -> BatchRead:
    """Every message of ``batch``, decoded; undecodable ones kept apart with the reason."""
    result = BatchRead()
    if batch.size == 0:
        return result
    consumer = kafka.consumer(group_id=None)
    partition = TopicPartition(batch.topic, batch.partition)
    try:
        consumer.assign([partition])
        consumer.seek(partition, batch.start)
        deadline = time.monotonic() + timeout_s
        expected = batch.start
        while expected < batch.end:
            if time.monotonic() > deadline:
                raise K2Error(
                    f"read only {expected - batch.start} of {batch.size} messages of {batch.key} within "
                    f"{timeout_s:.0f}s; is the broker at {kafka.servers} healthy and the range still retained?"
                )
            for message in consumer.poll(timeout_ms=500).get(partition, []):
                if message.offset < expected:
                    continue  # a re-delivered offset
                if message.offset >= batch.end:
                    break
                # Offsets can skip (compacted topics, transaction markers): take what exists below end.
                expected = message.offset + 1
                result.last_offset_seen = message.offset
                try:
                    record = decode_trade(message.value)
                    # The Kafka offset is the platform's sequence: it orders the partition's log.
                    record["platform_sequence"] = message.offset
                    result.records.append(record)
                except (SchemaMismatchError, ValueError, EOFError, TypeError) as exc:
                    result.dead_letters.append((message.offset, message.value or b"", f"undecodable: {exc}"))
            position = consumer.position(partition)
            if position is not None and position >= batch.end:
                break
    finally:
        consumer.close()
    return result


def commit_range(
    iceberg: IcebergResource,
    batch: OffsetRange,
    records: list[dict],
    max_attempts: int = 8,
    before_commit: Callable[[], None] | None = None,
) -> BatchResult:
    """Append ``records`` (all of ``batch``) to market.trades in one commit, exactly once."""
    arrow = _sorted(to_arrow(records, TRADES)) if records else None
    for attempt in range(1, max_attempts + 1):
        table = iceberg.trades()
        committed = committed_offsets(table, batch.topic)
        done = committed.get(batch.partition, 0)
        if done >= batch.end:
            return BatchResult(batch, 0, 0, True, None, 0.0)
        if done != batch.start:
            raise OffsetGapError(
                f"{batch.key} does not start where market.trades ends for {batch.topic}[{batch.partition}] "
                f"(committed up to offset {done}); run the range starting at {done} first, or if the topic was "
                "recreated set a new baseline with `k2 offsets reset --topic <topic>`"
            )
        committed_after = dict(committed)
        committed_after[batch.partition] = batch.end
        summary, properties = commit_properties(batch, committed_after)
        started = time.perf_counter()
        try:
            if before_commit is not None:
                before_commit()
            with table.transaction() as transaction:
                if arrow is not None and arrow.num_rows:
                    transaction.append(arrow, snapshot_properties=summary)
                transaction.set_properties(properties)
        except CommitFailedException as exc:
            # Another batch (another partition, or a maintenance rewrite) committed first: reload and retry.
            log.info("commit of %s conflicted (attempt %d): %s", batch.key, attempt, exc)
            time.sleep(min(0.05 * 2**attempt, 2.0))
            continue
        table.refresh()
        snapshot = table.current_snapshot()
        return BatchResult(batch, len(records), 0, False, snapshot.snapshot_id if snapshot else None,
                           time.perf_counter() - started)
    raise K2Error(f"{batch.key}: {max_attempts} commit attempts conflicted; the table is under heavy concurrent "
                  "writes, run the batch again")


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("symbol", "ascending"), ("timestamp", "ascending")])


def send_dead_letters(kafka: KafkaResource, batch: OffsetRange, dead: list[tuple[int, bytes, str]]) -> None:
    """Undecodable messages to ``<topic>.dlq``: raw bytes as value, reason and origin in headers."""
    if not dead:
        return
    producer = kafka.producer()
    try:
        for offset, raw, reason in dead:
            producer.send(dead_letter_topic(batch.topic), value=raw, headers=[
                ("k2.reason", reason.encode()),
                ("k2.source", f"{batch.topic}/{batch.partition}@{offset}".encode()),
                ("k2.failed-at", datetime.now(timezone.utc).isoformat().encode()),
            ])
        producer.flush()
    finally:
        producer.close()


def commit_consumer_group(kafka: KafkaResource, batch: OffsetRange, group_id: str = CONSUMER_GROUP) -> None:
    """Move the consumer group to the batch end, so Kafka's own tools show the sink's lag too."""
    consumer = kafka.consumer(group_id=group_id)
    partition = TopicPartition(batch.topic, batch.partition)
    try:
        consumer.assign([partition])
        current = consumer.committed(partition)
        if current is None or current < batch.end:
            consumer.commit({partition: OffsetAndMetadata(batch.end, json.dumps({"k2": batch.key}), -1)})
    finally:
        consumer.close()


def run_microbatch(kafka: KafkaResource, iceberg: IcebergResource, batch: OffsetRange,
                   before_commit: Callable[[], None] | None = None) -> BatchResult:
    """Read, dead-letter, commit to Iceberg, then move the consumer group: one whole micro-batch."""
    table = iceberg.trades()
    if committed_offsets(table, batch.topic).get(batch.partition, 0) >= batch.end:
        commit_consumer_group(kafka, batch)
        return BatchResult(batch, 0, 0, True, None, 0.0)
    read = read_range(kafka, batch)
    # Dead letters first: if the run dies after this, the re-run sends them again (at-least-once
    # for the DLQ, which carries the source offset to dedupe on), while the table stays exact.
    send_dead_letters(kafka, batch, read.dead_letters)
    result = commit_range(iceberg, batch, read.records, before_commit=before_commit)
    commit_consumer_group(kafka, batch)
    return BatchResult(result.batch, result.written, len(read.dead_letters), result.already_committed,
                       result.snapshot_id, result.commit_seconds)
