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

Bad records never stall the stream: a message that does not decode, or that decodes but cannot
be stored in ``market.trades`` (a price beyond decimal(18,8), a value Arrow rejects), goes to
``<topic>.dlq`` with the reason and its source offset, and the rest of its batch commits.

Retention: when Kafka has deleted the start of a range before it was read (the partition's log
start passed the table's committed offset), the lost offsets are not silently skipped: the
commit that moves the committed offset past them records them as a retention loss in its
snapshot summary and in the table property ``k2.kafka.losses.<topic>`` (see offsets.py), and the
stream sensor's ``retention_loss`` check stays ERROR until an operator accepts the loss.

Degradation (the level travels in the run's config; see k2_resources/degradation/levels.py):

- NORMAL: rows are enriched (``enrich``: ``k2.notional`` = price x quantity as an exact decimal
  string and ``k2.tier``, the symbol's load-shedding tier, added to vendor_data) and appended.
- SOFT: enrichment is skipped; the normalised V2 rows are appended as they came from Kafka.
- GRACEFUL: rows of tier-3 symbols are not written now. The commit appends the other rows, advances
  the committed offset and records the range as pending ``deferred`` (with the deferred symbols),
  in the same transaction (``offsets.PendingRange``).
- AGGRESSIVE: the raw batch (offset, timestamp, key, value; not even decoded) is spilled to Parquet
  (SpillStore) and the commit advances the offset with no rows and a pending ``spilled`` entry.
- ``recover_range`` later appends the missing rows of a pending range (re-read from Kafka and
  filtered to the deferred symbols, or read from the spill file) and removes its entry in ONE
  commit; a re-run finds no entry and writes nothing; then the spill file is deleted.

Every commit here is an Iceberg append (an empty one when there are no rows), so it makes a
snapshot whose summary records the range, and pyiceberg's snapshot-id requirement makes
concurrent commits (another partition, a recovery) conflict and retry instead of overwriting
each other's offset and pending properties. A retry re-checks the offsets and re-commits the
metadata with the Parquet files the first attempt wrote (``_WrittenRows``), so partitions that
commit at the same time do not rewrite their data.

Reading: a range is fetched and its record batches parsed column-wise (``columnar_fetch``), and
read with kafka-python's consumer whenever that path does not cover it.
"""

from __future__ import annotations

import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import _check_pyarrow_schema_compatible, _dataframe_to_data_files
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from k2_resources import metrics
from k2_resources.catalog.resource import IcebergResource, catalog_busy, to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.degradation.shedding import LoadShedder
from k2_resources.degradation.spill import SpillStore
from k2_resources.errors import K2Error, SchemaMismatchError
from k2_resources.kafka.columnar_fetch import FastFetchUnavailable, fetch_range
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.schemas import TRADE_V2, decode_trade
from k2_resources.schemas.avro import TRADE_V2_SCHEMA_ID
from k2_resources.schemas.columnar import UnsupportedSchema, decode_columnar
from k2_resources.sink.offsets import (
    DEFERRED,
    LOSS_SUMMARY_KEY,
    PREFIX,
    SPILLED,
    OffsetRange,
    PendingRange,
    RetentionLoss,
    commit_properties,
    committed_key,
    committed_offsets,
    loss_properties,
    pending_properties,
    pending_ranges,
    retention_losses,
)

log = logging.getLogger(__name__)

CONSUMER_GROUP = "k2-iceberg-sink"


class OffsetGapError(K2Error):
    """A micro-batch does not start where the table's committed offsets end."""


class RetentionLossError(K2Error):
    """Kafka deleted offsets of a range before they were read, and the caller cannot record the loss."""


def _no_rows() -> pa.Table:
    return TRADES.arrow_schema().empty_table()


@dataclass
class BatchRead:
    """What was read from one offset range: the storable rows as one Arrow table in offset order."""

    rows: pa.Table = field(default_factory=_no_rows, repr=False)  # market.trades' schema; platform_sequence = offset
    dead_letters: list[tuple[int, bytes, str]] = field(default_factory=list)  # (offset, raw, reason)
    last_offset_seen: int = -1
    lost: list[tuple[int, int]] = field(default_factory=list)  # [start, end) deleted by retention before the read
    raw_values: list[bytes] = field(default_factory=list, repr=False)  # the message of each row, same order

    @property
    def records(self) -> list[dict]:
        """The rows as dicts of Python values, as ``decode_trade`` gives them (Decimal, aware
        datetime, dict vendor_data); costs a Python object per value, so prefer ``rows``."""
        return rows_to_records(self.rows)


def rows_to_records(rows: pa.Table) -> list[dict]:
    """Rows of market.trades' Arrow schema as record dicts (maps as dicts, as fastavro decodes them)."""
    records = rows.to_pylist()
    for record in records:
        if record.get("vendor_data") is not None:
            record["vendor_data"] = dict(record["vendor_data"])
    return records


@dataclass(frozen=True)
class BatchResult:
    """The outcome of one micro-batch (or of the recovery of one pending range)."""

    batch: OffsetRange
    written: int
    dead_lettered: int
    already_committed: bool
    snapshot_id: int | None
    commit_seconds: float
    deferred: int = 0  # rows left out now and recorded as a pending deferred range
    spilled: int = 0  # raw messages spilled to Parquet and recorded as a pending spilled range
    enriched: bool = False
    level: int = 0
    sequence_gaps: dict[str, int] = field(default_factory=dict)  # symbol -> trade ids missing in the range
    lost: int = 0  # offsets of the range Kafka had deleted before the read; recorded as a retention loss
    deferred_by_symbol: dict[str, int] = field(default_factory=dict)  # the deferred rows per symbol (shed counter)


def read_range(
    kafka: KafkaResource, batch: OffsetRange, timeout_s: float = 120.0, *, consumer: Any = None
) -> BatchRead:
    """Every message of ``batch``, decoded; undecodable and unstorable ones kept apart with the reason.

    The range is fetched and parsed column-wise (``columnar_fetch``: no Python object per
    message, which is most of what kafka-python's own poll loop costs); whatever that path does
    not cover (another broker leads the partition, retention deleted offsets, compressed or
    transactional batches, ...) is read with kafka-python, exactly as before.
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


def decode_batch(offsets: list[int] | pa.Array, values: list[bytes | None] | pa.Array) -> BatchRead:
    """Decode the messages (Kafka offsets and framed TradeV2 values) of one range into rows.

    All messages are decoded at once into Arrow columns (``decode_columnar``); only the ones that
    path does not take (malformed, unstorable, unusual) are decoded one by one with fastavro, which
    gives the reason a dead letter carries. The Kafka offset becomes ``platform_sequence``.
    """
    result = BatchRead()
    offset_array = offsets if isinstance(offsets, pa.Array) else pa.array(offsets, pa.int64())
    if len(offset_array) == 0:
        return result
    result.last_offset_seen = int(offset_array[-1].as_py())
    try:
        decoded = decode_columnar(
            values, TRADE_V2, TRADE_V2_SCHEMA_ID, TRADES.arrow_schema(), {"platform_sequence": offset_array}
        )
        rows, kept, irregular = decoded.table, decoded.rows.tolist(), decoded.irregular.tolist()
    except UnsupportedSchema as exc:  # a schema change this decoder does not cover yet: the slow, exact path
        log.warning("decoding %d messages one by one: %s", len(offset_array), exc)
        rows, kept, irregular = _no_rows(), [], list(range(len(offset_array)))
    if isinstance(values, pa.Array):
        value_at = lambda i: values[i].as_py()  # noqa: E731 - the few irregular messages only
        result.raw_values = values.take(pa.array(kept, pa.int64())).to_pylist()
    else:
        value_at = values.__getitem__
        result.raw_values = [values[i] for i in kept]
    if not irregular:
        result.rows = rows
        return result
    # The few that need a closer look: decoded with fastavro, then screened for storability.
    slow = _RecordsRead()
    for position in irregular:
        _decode_into(slow, int(offset_array[position].as_py()), value_at(position))
    slow = _screen_storable(slow)
    result.dead_letters = sorted(slow.dead_letters, key=lambda letter: letter[0])
    if slow.records_:
        both = pa.concat_tables([rows, to_arrow(slow.records_, TRADES)])
        order = pc.sort_indices(both["platform_sequence"]).to_numpy()
        raws = result.raw_values + slow.raw_values
        result.rows = both.take(order)
        result.raw_values = [raws[i] for i in order.tolist()]
    else:
        result.rows = rows
    return result


@dataclass
class _RecordsRead:
    """Messages decoded one by one into dicts (the fallback of ``decode_batch``)."""

    records_: list[dict] = field(default_factory=list)
    dead_letters: list[tuple[int, bytes, str]] = field(default_factory=list)
    raw_values: list[bytes] = field(default_factory=list)


def _decode_into(result: Any, offset: int, value: bytes | None) -> None:
    try:
        record = decode_trade(value)
        # The Kafka offset is the platform's sequence: it orders the partition's log.
        record["platform_sequence"] = offset
    except SchemaMismatchError as exc:
        result.dead_letters.append((offset, value or b"", f"undecodable: {exc}"))
        return
    except Exception as exc:
        result.dead_letters.append((offset, value or b"", f"undecodable: {type(exc).__name__}: {exc}"))
        return
    result.records_.append(record)
    result.raw_values.append(value or b"")


def unstorable_reason(record: dict) -> str | None:
    """Why ``record`` cannot be stored in market.trades (the Arrow conversion's error), or None."""
    try:
        to_arrow([record], TRADES)
    except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return f"unstorable in market.trades: {type(exc).__name__}: {exc}"
    return None


def _screen_storable(result: _RecordsRead) -> _RecordsRead:
    """Move records that decode but cannot be stored (a poison record) to the dead letters.

    The whole batch is converted once; only when that fails is each record tried alone, so the
    common case costs one conversion and a poison record never fails its batch.
    """
    if not result.records_ or unstorable_reason_of_batch(result.records_) is None:
        return result
    kept, raws = [], []
    for record, raw in zip(result.records_, result.raw_values):
        reason = unstorable_reason(record)
        if reason is None:
            kept.append(record)
            raws.append(raw)
        else:
            result.dead_letters.append((int(record["platform_sequence"]), raw, reason))
    result.dead_letters.sort(key=lambda letter: letter[0])
    result.records_, result.raw_values = kept, raws
    return result


def unstorable_reason_of_batch(records: list[dict]) -> str | None:
    """None when every record converts to the table's Arrow schema; else the first error."""
    try:
        to_arrow(records, TRADES)
    except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


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


def commit_range(
    iceberg: IcebergResource,
    batch: OffsetRange,
    records: list[dict] | pa.Table,
    max_attempts: int = 8,
    before_commit: Callable[[], None] | None = None,
    pending: PendingRange | None = None,
    lost: list[tuple[int, int]] | tuple[tuple[int, int], ...] = (),
) -> BatchResult:
    """Append ``records`` (rows of market.trades' Arrow schema, or record dicts; all of ``batch``
    except the rows ``pending`` says are missing) to market.trades in one commit, exactly once;
    ``pending`` and the retention losses ``lost`` (offset ranges of the batch Kafka had deleted)
    are recorded in the same commit."""
    written = _WrittenRows(_as_rows(records))
    for attempt in range(1, max_attempts + 1):
        try:
            table = iceberg.trades()
        except Exception as exc:
            if not catalog_busy(exc):
                raise
            _wait_for_catalog(batch.key, attempt, exc)
            continue
        if _blind_retries_on(table):
            _turn_off_blind_retries(table)
            continue
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
        if pending is not None:
            pending_after = pending_properties(batch.topic, [*pending_ranges(table, batch.topic), pending])
            summary.update(pending_after)
            properties.update(pending_after)
        if lost:
            _record_losses(table, batch, lost, summary, properties)
        seconds = _commit_once(table, written, summary, properties, before_commit, batch.key, attempt)
        if seconds is None:
            continue
        snapshot = table.current_snapshot()
        return BatchResult(batch, written.num_rows, 0, False, snapshot.snapshot_id if snapshot else None, seconds)
    raise K2Error(
        f"{batch.key}: {max_attempts} commit attempts conflicted; the table is under heavy concurrent "
        "writes, run the batch again"
    )


# pyiceberg (0.12) retries a conflicting commit by itself: it re-bases the appended files on the
# new snapshot but keeps this commit's table properties and summary as they were computed. For
# K2 those carry the committed offsets of *every* partition, so a commit of partition 0 that raced
# one of partition 1 would silently erase partition 1's offset (found by the parallel-partition
# benchmark: the next range of partition 1 was refused as a gap, and a sensor would re-request the
# range and append it twice). K2 retries itself, from a freshly loaded table; pyiceberg must not.
COMMIT_RETRIES_PROPERTY = "commit.retry.num-retries"


def _blind_retries_on(table: Table) -> bool:
    return table.properties.get(COMMIT_RETRIES_PROPERTY) != "0"


def _turn_off_blind_retries(table: Table) -> None:
    """Set ``commit.retry.num-retries`` = 0 on the table (once per table; a properties-only commit,
    which pyiceberg does not retry and which is harmless to repeat)."""
    try:
        with table.transaction() as transaction:
            transaction.set_properties({COMMIT_RETRIES_PROPERTY: "0"})
        log.info("set %s=0 on %s: K2 retries conflicting commits itself", COMMIT_RETRIES_PROPERTY, table.name())
    except CommitFailedException:
        pass  # another writer committed meanwhile (maybe this very property): the caller reloads and looks again
    except Exception as exc:
        if not catalog_busy(exc):
            raise


def _record_losses(
    table: Table,
    batch: OffsetRange,
    lost: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    summary: dict[str, str],
    properties: dict[str, str],
) -> None:
    """Add the retention losses of ``batch`` to a commit's summary (this commit's) and properties (all)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    new = [RetentionLoss(batch.topic, batch.partition, start, end, now) for start, end in lost]
    history = loss_properties(batch.topic, [*retention_losses(table, batch.topic), *new])
    summary[LOSS_SUMMARY_KEY] = json.dumps([loss.to_dict() for loss in new])
    summary.update(history)
    properties.update(history)
    for loss in new:
        log.error("retention loss recorded in market.trades: %s", loss.describe())


@dataclass
class _WrittenRows:
    """The rows of one commit and their Parquet data files, written once and re-used by every
    attempt of that commit: a conflict with another partition's commit then costs a metadata
    commit, not the Parquet write again (the retries kept two partitions' sinks from running in
    parallel). Written again only if the table's schema, spec or location changed meanwhile."""

    rows: pa.Table
    files: list[DataFile] | None = None
    written_for: tuple | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def data_files(self, table: Table) -> list[DataFile]:
        metadata = table.metadata
        layout = (metadata.current_schema_id, metadata.default_spec_id, metadata.location)
        if self.files is None or self.written_for != layout:
            _check_pyarrow_schema_compatible(
                metadata.schema(), provided_schema=self.rows.schema, format_version=metadata.format_version
            )
            self.files = (
                list(
                    _dataframe_to_data_files(
                        table_metadata=metadata, df=self.rows, io=table.io, write_uuid=uuid.uuid4()
                    )
                )
                if self.rows.num_rows
                else []
            )
            self.written_for = layout
        return self.files


def _commit_once(
    table: Table,
    written: _WrittenRows,
    summary: dict[str, str],
    properties: dict[str, str],
    before_commit: Callable[[], None] | None,
    what: str,
    attempt: int,
) -> float | None:
    """One commit attempt: rows and offset properties in one transaction; seconds, or None on a conflict.

    Always an append (possibly empty): a snapshot records the range, and its snapshot-id
    requirement makes a concurrent commit conflict instead of racing.
    """
    started = time.perf_counter()
    try:
        if before_commit is not None:
            before_commit()
        data_files = written.data_files(table)
        with table.transaction() as transaction:
            # What Transaction.append does, with the files written once for all attempts.
            with transaction._append_snapshot_producer(summary) as append_files:
                for data_file in data_files:
                    append_files.append_data_file(data_file)
            transaction.set_properties(properties)
    except CommitFailedException as exc:
        # Another batch (another partition, or a maintenance rewrite) committed first: reload and retry.
        log.info("commit of %s conflicted (attempt %d): %s", what, attempt, exc)
        time.sleep(commit_retry_seconds(attempt))
        return None
    except Exception as exc:
        # The catalog database was locked (another process writing to a SQLite catalog): nothing was
        # committed, so reload and retry; the committed-offset check makes the retry exactly once.
        if not catalog_busy(exc):
            raise
        _wait_for_catalog(what, attempt, exc)
        return None
    seconds = time.perf_counter() - started
    metrics.ICEBERG_COMMIT_SECONDS.observe(seconds)
    metrics.MICROBATCH_MESSAGES.inc(written.num_rows)
    try:
        table.refresh()
    except Exception as exc:  # committed already; a refresh that meets a locked catalog changes nothing
        if not catalog_busy(exc):
            raise
    return seconds


def commit_retry_seconds(attempt: int) -> float:
    """How long to wait before retrying a commit that lost to another writer's commit (or found the
    catalog locked by it).

    The other commit is done (or about to be) when this is seen, so the retry can start at once: a
    few milliseconds, jittered so two partitions' sinks do not collide again in step, doubling
    only under sustained contention (the 100, 200, 400 ms of before cost two partitions' sinks
    a tenth of their time in the parallel-partition benchmark). Seven attempts wait 2.5 s at most."""
    return random.uniform(0.5, 1.0) * min(0.01 * 2**attempt, 2.0)


def _wait_for_catalog(what: str, attempt: int, exc: BaseException) -> None:
    log.warning(
        "the Iceberg catalog is locked by another writer while committing %s (attempt %d): %s; retrying",
        what,
        attempt,
        exc,
    )
    time.sleep(commit_retry_seconds(attempt))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("symbol", "ascending"), ("timestamp", "ascending")])


def _as_rows(records: list[dict] | pa.Table) -> pa.Table:
    """Rows to append, in the table's sort order (symbol, then time)."""
    if isinstance(records, pa.Table):
        return _sorted(records.cast(TRADES.arrow_schema())) if records.num_rows else _no_rows()
    return _sorted(to_arrow(records, TRADES)) if records else _no_rows()


def send_dead_letters(kafka: KafkaResource, batch: OffsetRange, dead: list[tuple[int, bytes, str]]) -> None:
    """Undecodable messages to ``<topic>.dlq``: raw bytes as value, reason and origin in headers."""
    if not dead:
        return
    producer = kafka.producer()
    try:
        for offset, raw, reason in dead:
            producer.send(
                dead_letter_topic(batch.topic),
                value=raw,
                headers=[
                    ("k2.reason", reason.encode()),
                    ("k2.source", f"{batch.topic}/{batch.partition}@{offset}".encode()),
                    ("k2.failed-at", datetime.now(UTC).isoformat().encode()),
                ],
            )
        producer.flush()
    finally:
        producer.close()
    metrics.DEAD_LETTERS.labels(batch.topic).inc(len(dead))


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


NOTIONAL_KEY = "k2.notional"
TIER_KEY = "k2.tier"


def enrich_rows(rows: pa.Table, shedder: LoadShedder) -> pa.Table:
    """``rows`` with the derived fields of NORMAL operation added to each row's vendor_data.

    ``k2.notional``: price x quantity, an exact decimal string (the traded value in the quote
    currency); ``k2.tier``: the symbol's load-shedding tier when it was ingested. Both can be
    recomputed from the row, which is why SOFT and above may skip them. Column-wise; ``enrich``
    is the same definition record by record.
    """
    if rows.num_rows == 0:
        return rows
    notional = notional_strings(rows.column("price").combine_chunks(), rows.column("quantity").combine_chunks())
    tiers = _per_symbol(rows.column("symbol"), lambda symbol: str(shedder.tier(symbol)))
    index = rows.schema.get_field_index("vendor_data")
    vendor = _with_entries(rows.column(index).combine_chunks(), [(NOTIONAL_KEY, notional), (TIER_KEY, tiers)])
    return rows.set_column(index, rows.schema.field(index), vendor)


def notional_strings(price: pa.Array, quantity: pa.Array) -> pa.Array:
    """price x quantity of each row as the exact decimal in plain notation, trailing zeros dropped
    (what ``format(Decimal(p) * Decimal(q)).normalize(), "f")`` gives)."""
    product = pc.multiply(price, quantity)  # decimal128(18, 8) x decimal128(18, 8) -> decimal128(37, 16): exact
    text = pc.utf8_rtrim(pc.utf8_rtrim(pc.cast(product, pa.large_string()), characters="0"), characters=".")
    scientific = np.asarray(pc.match_substring(text, "E"), bool)
    if not scientific.any():
        return text
    # Arrow writes very small values in scientific notation: those few are formatted by Python.
    plain = text.to_pylist()
    for row in np.flatnonzero(scientific).tolist():
        plain[row] = _plain(Decimal(price[row].as_py()) * Decimal(quantity[row].as_py()))
    return pa.array(plain, pa.large_string())


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _per_symbol(symbols: pa.ChunkedArray | pa.Array, value_of: Callable[[str], str]) -> pa.Array:
    """``value_of(symbol)`` for each row, computed once per distinct symbol."""
    encoded = pc.dictionary_encode(symbols.combine_chunks() if isinstance(symbols, pa.ChunkedArray) else symbols)
    values = pa.array([value_of(symbol) for symbol in encoded.dictionary.to_pylist()], pa.large_string())
    return values.take(encoded.indices)


def _symbol_mask(symbols: pa.ChunkedArray, wanted: Callable[[str], bool]) -> pa.Array:
    """A boolean per row: ``wanted(symbol)``, decided once per distinct symbol."""
    encoded = pc.dictionary_encode(symbols.combine_chunks())
    chosen = [i for i, symbol in enumerate(encoded.dictionary.to_pylist()) if wanted(symbol)]
    return pa.array(np.isin(np.asarray(encoded.indices, np.int64), chosen), pa.bool_())


def _with_entries(maps: pa.MapArray, entries: list[tuple[str, pa.Array]]) -> pa.MapArray:
    """Each row's map with ``entries`` (key, one value per row) set, after its own entries (a
    null map counts as empty), like ``dict.update`` on each row."""
    n = len(maps)
    offsets = np.asarray(maps.offsets, np.int64)  # positions in the (whole, unsliced) key/item children
    counts = np.diff(offsets)
    counts[np.asarray(maps.is_null(), bool)] = 0  # a null row holds no entries, whatever its offsets say
    ends = np.cumsum(counts)
    positions = pa.array(np.repeat(offsets[:-1] - (ends - counts), counts) + np.arange(int(ends[-1]) if n else 0))
    keys, items = maps.keys.take(positions), maps.items.take(positions)
    rows = np.repeat(np.arange(n), counts)
    keep = ~np.asarray(pc.is_in(keys, pa.array([key for key, _ in entries], keys.type)), bool)
    if not keep.all():  # an entry of the same key is replaced
        keys, items, rows = keys.filter(pa.array(keep)), items.filter(pa.array(keep)), rows[keep]
        counts = np.bincount(rows, minlength=n).astype(np.int64)
    all_keys = pa.concat_arrays(
        [keys.cast(pa.large_string()), *[pa.array(np.full(n, key, object), pa.large_string()) for key, _ in entries]]
    )
    all_items = pa.concat_arrays(
        [items.cast(pa.large_string()), *[values.cast(pa.large_string()) for _, values in entries]]
    )
    all_rows = np.concatenate([rows, *[np.arange(n)] * len(entries)])
    order = pa.array(np.argsort(all_rows, kind="stable"))
    new_offsets = np.zeros(n + 1, np.int32)
    np.cumsum(counts + len(entries), out=new_offsets[1:])
    return pa.MapArray.from_arrays(
        pa.array(new_offsets),
        all_keys.take(order).cast(maps.type.key_type),
        all_items.take(order).cast(maps.type.item_type),
        type=maps.type,
    )


def enrich(records: list[dict], shedder: LoadShedder) -> None:
    """``enrich_rows`` for record dicts (in place): the per-record definition of the enrichment."""
    for record in records:
        vendor = dict(record.get("vendor_data") or {})
        price, quantity = record["price"], record["quantity"]
        notional = Decimal(price) * Decimal(quantity)
        vendor[NOTIONAL_KEY] = _plain(notional)
        vendor[TIER_KEY] = str(shedder.tier(record["symbol"]))
        record["vendor_data"] = vendor


def sequence_gaps_of(rows: pa.Table) -> dict[str, int]:
    """Trade ids missing inside this batch, per symbol (Binance ids are contiguous per symbol).

    Column-wise over ``rows`` (symbol, source_sequence); the same as ``sequence_gaps``.
    """
    sequence = rows.column("source_sequence").combine_chunks()
    present = pc.is_valid(sequence)
    values = np.asarray(sequence.filter(present), np.int64)
    if values.size < 2:
        return {}
    if values.min() < -(2**62) or values.max() > 2**62:  # differences could overflow int64: count in Python
        return sequence_gaps(rows_to_records(rows.select(["symbol", "source_sequence"])))
    encoded = pc.dictionary_encode(rows.column("symbol").combine_chunks().filter(present))
    symbol = np.asarray(encoded.indices, np.int64)
    order = np.lexsort((values, symbol))
    symbol, values = symbol[order], values[order]
    step = np.diff(values)
    missing = np.where((symbol[1:] == symbol[:-1]) & (step > 1), step - 1, 0)
    per_symbol = np.zeros(len(encoded.dictionary), np.int64)
    np.add.at(per_symbol, symbol[1:], missing)
    names = encoded.dictionary.to_pylist()
    return {names[i]: int(count) for i, count in enumerate(per_symbol.tolist()) if count}


def sequence_gaps(records: list[dict]) -> dict[str, int]:
    """Trade ids missing inside this batch, per symbol (Binance ids are contiguous per symbol)."""
    ids: dict[str, list[int]] = {}
    for record in records:
        sequence = record.get("source_sequence")
        if sequence is not None:
            ids.setdefault(record["symbol"], []).append(int(sequence))
    gaps: dict[str, int] = {}
    for symbol, values in ids.items():
        values.sort()
        missing = sum(b - a - 1 for a, b in zip(values, values[1:]) if b - a > 1)
        if missing:
            gaps[symbol] = missing
    return gaps


def split_rows(rows: pa.Table, shedder: LoadShedder, level: int) -> tuple[pa.Table, dict[str, int]]:
    """(rows kept now, deferred row count per symbol) at degradation ``level`` (``LoadShedder.split``
    for a table: the decision is taken once per distinct symbol)."""
    if rows.num_rows == 0:
        return rows, {}
    encoded = pc.dictionary_encode(rows.column("symbol").combine_chunks())
    names = encoded.dictionary.to_pylist()
    deferred_symbols = [i for i, symbol in enumerate(names) if shedder.should_defer(symbol, level)]
    if not deferred_symbols:
        return rows, {}
    symbol = np.asarray(encoded.indices, np.int64)
    deferred = np.isin(symbol, deferred_symbols)
    counts = np.bincount(symbol[deferred], minlength=len(names))
    return rows.filter(pa.array(~deferred)), {names[i]: int(counts[i]) for i in deferred_symbols if counts[i]}


def run_microbatch(
    kafka: KafkaResource,
    iceberg: IcebergResource,
    batch: OffsetRange,
    before_commit: Callable[[], None] | None = None,
    *,
    level: int = 0,
    shedder: LoadShedder | None = None,
    spill_store: SpillStore | None = None,
    consumer: Any = None,
) -> BatchResult:
    """Read, dead-letter, commit to Iceberg, then move the consumer group: one whole micro-batch.

    ``level`` is the degradation level (0 NORMAL .. 3 AGGRESSIVE) the run works at; see the
    module docstring for what each level writes. ``consumer``: an open consumer to read with
    (a caller that runs many ranges keeps one); by default one is made for the range.
    """
    shedder = shedder or LoadShedder()
    table = iceberg.trades()
    if committed_offsets(table, batch.topic).get(batch.partition, 0) >= batch.end:
        commit_consumer_group(kafka, batch)
        return BatchResult(batch, 0, 0, True, None, 0.0, level=level)
    if shedder.spill(level):
        return _spill_microbatch(kafka, iceberg, batch, before_commit, level, spill_store or SpillStore())
    read = read_range(kafka, batch, consumer=consumer)
    # Dead letters first: if the run dies after this, the re-run sends them again (at-least-once
    # for the DLQ, which carries the source offset to dedupe on), while the table stays exact.
    send_dead_letters(kafka, batch, read.dead_letters)
    gaps = sequence_gaps_of(read.rows)
    kept, by_symbol = split_rows(read.rows, shedder, level)
    deferred = sum(by_symbol.values())
    pending = None
    if deferred:
        # Counted by `k2 metrics` from the run's materialisation (k2_shed_messages_total), not here:
        # a run's process serves no metrics.
        pending = PendingRange(
            batch.topic, batch.partition, batch.start, batch.end, DEFERRED, tuple(sorted(by_symbol)), deferred
        )
    enriched = not shedder.skip_enrichment(level)
    if enriched:
        kept = enrich_rows(kept, shedder)
    result = commit_range(iceberg, batch, kept, before_commit=before_commit, pending=pending, lost=read.lost)
    commit_consumer_group(kafka, batch)
    return BatchResult(
        result.batch,
        result.written,
        len(read.dead_letters),
        result.already_committed,
        result.snapshot_id,
        result.commit_seconds,
        deferred=0 if result.already_committed else deferred,
        enriched=enriched,
        level=level,
        sequence_gaps=gaps,
        lost=0 if result.already_committed else sum(end - start for start, end in read.lost),
        deferred_by_symbol={} if result.already_committed else by_symbol,
    )


def _spill_microbatch(
    kafka: KafkaResource,
    iceberg: IcebergResource,
    batch: OffsetRange,
    before_commit: Callable[[], None] | None,
    level: int,
    spill_store: SpillStore,
) -> BatchResult:
    """AGGRESSIVE: spill the raw range to Parquet, then commit the offsets with a pending spilled entry."""
    lost: list[tuple[int, int]] = []
    raw = read_raw_range(kafka, batch, lost=lost)
    committed = committed_offsets(iceberg.trades(), batch.topic).get(batch.partition, 0)
    pending_here = {
        (p.start, p.end)
        for p in pending_ranges(iceberg.trades(), batch.topic)
        if p.kind == SPILLED and p.partition == batch.partition
    }
    for stale in spill_store.list(batch.topic, batch.partition):
        # A file at or above the committed offset that the table does not list is what a run that
        # died before its commit left behind: this run owns that range now.
        if stale.start >= committed and (stale.start, stale.end) not in pending_here:
            spill_store.delete(stale)
    spill_store.write(batch.topic, batch.partition, batch.start, batch.end, raw)
    pending = PendingRange(batch.topic, batch.partition, batch.start, batch.end, SPILLED, (), raw.num_rows)
    result = commit_range(iceberg, batch, [], before_commit=before_commit, pending=pending, lost=lost)
    if result.already_committed and _find_pending(iceberg, batch) is None:
        _delete_spilled(spill_store, batch)  # another run committed this range meanwhile: the file is not needed
    commit_consumer_group(kafka, batch)
    return BatchResult(
        result.batch,
        0,
        0,
        result.already_committed,
        result.snapshot_id,
        result.commit_seconds,
        spilled=0 if result.already_committed else raw.num_rows,
        level=level,
        lost=0 if result.already_committed else sum(end - start for start, end in lost),
    )


def recover_range(
    kafka: KafkaResource,
    iceberg: IcebergResource,
    batch: OffsetRange,
    *,
    level: int = 0,
    shedder: LoadShedder | None = None,
    spill_store: SpillStore | None = None,
    before_commit: Callable[[], None] | None = None,
    max_attempts: int = 8,
) -> BatchResult:
    """Write the missing rows of the pending range ``batch`` and remove its entry, in one commit.

    A range that is not (or no longer) pending writes nothing; its spill file, if one is left, is
    deleted. Deferred rows are re-read from Kafka (the deferred symbols only); spilled rows come
    from the spill file, or from Kafka if the file is gone.
    """
    shedder = shedder or LoadShedder()
    spill_store = spill_store or SpillStore()
    entry = _find_pending(iceberg, batch)
    if entry is None:
        _delete_spilled(spill_store, batch)
        return BatchResult(batch, 0, 0, True, None, 0.0, level=level)
    dead: list[tuple[int, bytes, str]] = []
    lost: list[tuple[int, int]] = []
    if entry.kind == DEFERRED:
        # The first pass already dead-lettered this range's undecodable and unstorable messages.
        read = read_range(kafka, batch)
        rows, lost = read.rows.filter(_symbol_mask(read.rows.column("symbol"), entry.is_missing)), read.lost
    else:
        files = [
            f for f in spill_store.list(batch.topic, batch.partition) if (f.start, f.end) == (batch.start, batch.end)
        ]
        read = decode_raw(spill_store.read(files[0])) if files else read_range(kafka, batch)
        rows, dead, lost = read.rows, read.dead_letters, read.lost
        send_dead_letters(kafka, batch, dead)
    gaps = sequence_gaps_of(rows)
    enriched = not shedder.skip_enrichment(level)
    if enriched:
        rows = enrich_rows(rows, shedder)
    written = _WrittenRows(_as_rows(rows))
    for attempt in range(1, max_attempts + 1):
        table = iceberg.trades()
        if _blind_retries_on(table):
            _turn_off_blind_retries(table)
            continue
        pending = pending_ranges(table, batch.topic)
        if not any(p.same_range(entry) for p in pending):
            _delete_spilled(spill_store, batch)
            return BatchResult(batch, 0, len(dead), True, None, 0.0, level=level)
        remaining = pending_properties(batch.topic, [p for p in pending if not p.same_range(entry)])
        committed = committed_offsets(table, batch.topic)
        summary = {
            f"{PREFIX}.topic": batch.topic,
            f"{PREFIX}.recovered-range": f"{batch.partition}:{batch.start}-{batch.end}",
            f"{PREFIX}.recovered-kind": entry.kind,
            committed_key(batch.topic): json.dumps({str(p): o for p, o in sorted(committed.items())}),
            **remaining,
        }
        properties = dict(remaining)
        if lost:  # the range outlived Kafka's retention: what is gone is recorded, in this commit
            _record_losses(table, batch, lost, summary, properties)
        seconds = _commit_once(table, written, summary, properties, before_commit, f"recovery of {entry.key}", attempt)
        if seconds is None:
            continue
        snapshot = table.current_snapshot()
        _delete_spilled(spill_store, batch)
        return BatchResult(
            batch,
            written.num_rows,
            len(dead),
            False,
            snapshot.snapshot_id if snapshot else None,
            seconds,
            enriched=enriched,
            level=level,
            sequence_gaps=gaps,
            lost=sum(end - start for start, end in lost),
        )
    raise K2Error(f"recovery of {entry.key}: {max_attempts} commit attempts conflicted; run it again")


def _find_pending(iceberg: IcebergResource, batch: OffsetRange) -> PendingRange | None:
    for entry in pending_ranges(iceberg.trades(), batch.topic):
        if (entry.partition, entry.start, entry.end) == (batch.partition, batch.start, batch.end):
            return entry
    return None


def _delete_spilled(spill_store: SpillStore, batch: OffsetRange) -> None:
    for spilled in spill_store.list(batch.topic, batch.partition):
        if (spilled.start, spilled.end) == (batch.start, batch.end):
            spill_store.delete(spilled)
