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
each other's offset and pending properties.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Iterator

import pyarrow as pa
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table import Table

from k2_resources import metrics
from k2_resources.degradation.shedding import LoadShedder
from k2_resources.degradation.spill import SpillStore
from k2_resources.errors import K2Error, SchemaMismatchError
from k2_resources.iceberg import IcebergResource, catalog_busy, to_arrow
from k2_resources.kafka import KafkaResource
from k2_resources.schemas import decode_trade
from k2_resources.tables import TRADES
from k2_resources.topics import dead_letter_topic
from k2_resources.trades.offsets import (
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


@dataclass
class BatchRead:
    """What was read from one offset range."""

    records: list[dict] = field(default_factory=list)
    dead_letters: list[tuple[int, bytes, str]] = field(default_factory=list)  # (offset, raw, reason)
    last_offset_seen: int = -1
    lost: list[tuple[int, int]] = field(default_factory=list)  # [start, end) deleted by retention before the read
    raw_values: list[bytes] = field(default_factory=list, repr=False)  # the message of each record, same order


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


def read_range(kafka: KafkaResource, batch: OffsetRange, timeout_s: float = 120.0) -> BatchRead:
    """Every message of ``batch``, decoded; undecodable ones kept apart with the reason."""
    result = BatchRead()
    for message in _messages(kafka, batch, timeout_s, result.lost):
        result.last_offset_seen = message.offset
        _decode_into(result, message.offset, message.value)
    return _screen_storable(result)


def _decode_into(result: BatchRead, offset: int, value: bytes | None) -> None:
    try:
        record = decode_trade(value)
        # The Kafka offset is the platform's sequence: it orders the partition's log.
        record["platform_sequence"] = offset
    except SchemaMismatchError as exc:
        result.dead_letters.append((offset, value or b"", f"undecodable: {exc}"))
        return
    except Exception as exc:  # noqa: BLE001 - any failure to decode untrusted bytes is this record's, not the batch's
        result.dead_letters.append((offset, value or b"", f"undecodable: {type(exc).__name__}: {exc}"))
        return
    result.records.append(record)
    result.raw_values.append(value or b"")


def unstorable_reason(record: dict) -> str | None:
    """Why ``record`` cannot be stored in market.trades (the Arrow conversion's error), or None."""
    try:
        to_arrow([record], TRADES)
    except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return f"unstorable in market.trades: {type(exc).__name__}: {exc}"
    return None


def _screen_storable(result: BatchRead) -> BatchRead:
    """Move records that decode but cannot be stored (a poison record) to the dead letters.

    The whole batch is converted once; only when that fails is each record tried alone, so the
    common case costs one conversion and a poison record never fails its batch.
    """
    if not result.records or unstorable_reason_of_batch(result.records) is None:
        return result
    kept, raws = [], []
    for record, raw in zip(result.records, result.raw_values):
        reason = unstorable_reason(record)
        if reason is None:
            kept.append(record)
            raws.append(raw)
        else:
            result.dead_letters.append((int(record["platform_sequence"]), raw, reason))
    result.dead_letters.sort(key=lambda letter: letter[0])
    result.records, result.raw_values = kept, raws
    return result


def unstorable_reason_of_batch(records: list[dict]) -> str | None:
    """None when every record converts to the table's Arrow schema; else the first error."""
    try:
        to_arrow(records, TRADES)
    except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


RAW_SCHEMA = pa.schema([
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("timestamp_ms", pa.int64()),
    pa.field("key", pa.binary()),
    pa.field("value", pa.binary()),
])


def read_raw_range(kafka: KafkaResource, batch: OffsetRange, timeout_s: float = 120.0,
                   lost: list[tuple[int, int]] | None = None) -> pa.Table:
    """The messages of ``batch`` as they are in Kafka (offset, timestamp, key, value), not decoded.

    Offsets Kafka already deleted are appended to ``lost``; without a list to record them in,
    such a loss raises RetentionLossError.
    """
    offsets, stamps, keys, values = [], [], [], []
    for message in _messages(kafka, batch, timeout_s, lost):
        offsets.append(message.offset)
        stamps.append(message.timestamp)
        keys.append(message.key)
        values.append(message.value)
    return pa.table({"offset": offsets, "timestamp_ms": stamps, "key": keys, "value": values}, schema=RAW_SCHEMA)


def decode_raw(raw: pa.Table) -> BatchRead:
    """Decode a raw batch (``read_raw_range`` / a spill file) like ``read_range`` would."""
    result = BatchRead()
    for offset, value in zip(raw.column("offset").to_pylist(), raw.column("value").to_pylist()):
        result.last_offset_seen = offset
        _decode_into(result, offset, value)
    return _screen_storable(result)


def _note_loss(lost: list[tuple[int, int]] | None, batch: OffsetRange, start: int, end: int) -> None:
    if lost is None:
        raise RetentionLossError(
            f"{batch.key}: offsets [{start}, {end}) of {batch.topic}[{batch.partition}] were deleted by Kafka "
            "retention before they were read; run the micro-batch (it records the loss) and see "
            "`k2 offsets show`")
    if lost and lost[-1][1] == start:
        lost[-1] = (lost[-1][0], end)
    else:
        lost.append((start, end))
    log.warning("%s: offsets [%d, %d) were deleted by Kafka retention before they were read", batch.key, start, end)


def _messages(kafka: KafkaResource, batch: OffsetRange, timeout_s: float,
              lost: list[tuple[int, int]] | None = None) -> Iterator[Any]:
    """The Kafka messages of ``batch`` in offset order (assign + seek, no consumer group).

    Offsets below the partition's log start (deleted by retention) are never skipped silently:
    they are appended to ``lost`` ([start, end) ranges), or raise RetentionLossError without it.
    """
    if batch.size == 0:
        return
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
            for message in consumer.poll(timeout_ms=500).get(partition, []):
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
                yield message
            position = consumer.position(partition)
            if position is not None and position >= batch.end:
                break
    finally:
        consumer.close()


def commit_range(
    iceberg: IcebergResource,
    batch: OffsetRange,
    records: list[dict],
    max_attempts: int = 8,
    before_commit: Callable[[], None] | None = None,
    pending: PendingRange | None = None,
    lost: list[tuple[int, int]] | tuple[tuple[int, int], ...] = (),
) -> BatchResult:
    """Append ``records`` (all of ``batch``, except the rows ``pending`` says are missing) to
    market.trades in one commit, exactly once; ``pending`` and the retention losses ``lost``
    (offset ranges of the batch Kafka had deleted) are recorded in the same commit."""
    arrow = _sorted(to_arrow(records, TRADES)) if records else to_arrow([], TRADES)
    for attempt in range(1, max_attempts + 1):
        try:
            table = iceberg.trades()
        except Exception as exc:
            if not catalog_busy(exc):
                raise
            _wait_for_catalog(batch.key, attempt, exc)
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
        seconds = _commit_once(table, arrow, summary, properties, before_commit, batch.key, attempt)
        if seconds is None:
            continue
        snapshot = table.current_snapshot()
        return BatchResult(batch, len(records), 0, False, snapshot.snapshot_id if snapshot else None, seconds)
    raise K2Error(f"{batch.key}: {max_attempts} commit attempts conflicted; the table is under heavy concurrent "
                  "writes, run the batch again")


def _record_losses(table: Table, batch: OffsetRange, lost: list[tuple[int, int]] | tuple[tuple[int, int], ...],
                   summary: dict[str, str], properties: dict[str, str]) -> None:
    """Add the retention losses of ``batch`` to a commit's summary (this commit's) and properties (all)."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    new = [RetentionLoss(batch.topic, batch.partition, start, end, now) for start, end in lost]
    history = loss_properties(batch.topic, [*retention_losses(table, batch.topic), *new])
    summary[LOSS_SUMMARY_KEY] = json.dumps([loss.to_dict() for loss in new])
    summary.update(history)
    properties.update(history)
    for loss in new:
        log.error("retention loss recorded in market.trades: %s", loss.describe())


def _commit_once(table: Table, arrow: pa.Table, summary: dict[str, str], properties: dict[str, str],
                 before_commit: Callable[[], None] | None, what: str, attempt: int) -> float | None:
    """One commit attempt: rows and offset properties in one transaction; seconds, or None on a conflict.

    Always an append (possibly empty): a snapshot records the range, and its snapshot-id
    requirement makes a concurrent commit conflict instead of racing.
    """
    started = time.perf_counter()
    try:
        if before_commit is not None:
            before_commit()
        with table.transaction() as transaction:
            transaction.append(arrow, snapshot_properties=summary)
            transaction.set_properties(properties)
    except CommitFailedException as exc:
        # Another batch (another partition, or a maintenance rewrite) committed first: reload and retry.
        log.info("commit of %s conflicted (attempt %d): %s", what, attempt, exc)
        time.sleep(min(0.05 * 2**attempt, 2.0))
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
    metrics.MICROBATCH_MESSAGES.inc(arrow.num_rows)
    try:
        table.refresh()
    except Exception as exc:  # committed already; a refresh that meets a locked catalog changes nothing
        if not catalog_busy(exc):
            raise
    return seconds


def _wait_for_catalog(what: str, attempt: int, exc: BaseException) -> None:
    log.warning("the Iceberg catalog is locked by another writer while committing %s (attempt %d): %s; "
                "retrying", what, attempt, exc)
    time.sleep(min(0.05 * 2**attempt, 2.0))


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


def enrich(records: list[dict], shedder: LoadShedder) -> None:
    """Add the derived fields of NORMAL operation to each record's vendor_data (in place).

    ``k2.notional``: price x quantity, an exact decimal string (the traded value in the quote
    currency); ``k2.tier``: the symbol's load-shedding tier when it was ingested. Both can be
    recomputed from the row, which is why SOFT and above may skip them.
    """
    for record in records:
        vendor = dict(record.get("vendor_data") or {})
        price, quantity = record["price"], record["quantity"]
        notional = Decimal(price) * Decimal(quantity)
        vendor["k2.notional"] = format(notional.normalize(), "f")
        vendor["k2.tier"] = str(shedder.tier(record["symbol"]))
        record["vendor_data"] = vendor


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


def run_microbatch(kafka: KafkaResource, iceberg: IcebergResource, batch: OffsetRange,
                   before_commit: Callable[[], None] | None = None, *, level: int = 0,
                   shedder: LoadShedder | None = None, spill_store: SpillStore | None = None) -> BatchResult:
    """Read, dead-letter, commit to Iceberg, then move the consumer group: one whole micro-batch.

    ``level`` is the degradation level (0 NORMAL .. 3 AGGRESSIVE) the run works at; see the
    module docstring for what each level writes.
    """
    shedder = shedder or LoadShedder()
    table = iceberg.trades()
    if committed_offsets(table, batch.topic).get(batch.partition, 0) >= batch.end:
        commit_consumer_group(kafka, batch)
        return BatchResult(batch, 0, 0, True, None, 0.0, level=level)
    if shedder.spill(level):
        return _spill_microbatch(kafka, iceberg, batch, before_commit, level, spill_store or SpillStore())
    read = read_range(kafka, batch)
    # Dead letters first: if the run dies after this, the re-run sends them again (at-least-once
    # for the DLQ, which carries the source offset to dedupe on), while the table stays exact.
    send_dead_letters(kafka, batch, read.dead_letters)
    gaps = sequence_gaps(read.records)
    kept, deferred = shedder.split(read.records, level)
    pending = None
    by_symbol: dict[str, int] = {}
    if deferred:
        # Counted by `k2 metrics` from the run's materialisation (k2_shed_messages_total), not here:
        # a run's process serves no metrics.
        for record in deferred:
            by_symbol[record["symbol"]] = by_symbol.get(record["symbol"], 0) + 1
        pending = PendingRange(batch.topic, batch.partition, batch.start, batch.end, DEFERRED,
                               tuple(sorted(by_symbol)), len(deferred))
    enriched = not shedder.skip_enrichment(level)
    if enriched:
        enrich(kept, shedder)
    result = commit_range(iceberg, batch, kept, before_commit=before_commit, pending=pending, lost=read.lost)
    commit_consumer_group(kafka, batch)
    return BatchResult(result.batch, result.written, len(read.dead_letters), result.already_committed,
                       result.snapshot_id, result.commit_seconds, deferred=0 if result.already_committed else len(deferred),
                       enriched=enriched, level=level, sequence_gaps=gaps,
                       lost=0 if result.already_committed else sum(end - start for start, end in read.lost),
                       deferred_by_symbol={} if result.already_committed else by_symbol)


def _spill_microbatch(kafka: KafkaResource, iceberg: IcebergResource, batch: OffsetRange,
                      before_commit: Callable[[], None] | None, level: int, spill_store: SpillStore) -> BatchResult:
    """AGGRESSIVE: spill the raw range to Parquet, then commit the offsets with a pending spilled entry."""
    lost: list[tuple[int, int]] = []
    raw = read_raw_range(kafka, batch, lost=lost)
    committed = committed_offsets(iceberg.trades(), batch.topic).get(batch.partition, 0)
    pending_here = {(p.start, p.end) for p in pending_ranges(iceberg.trades(), batch.topic)
                    if p.kind == SPILLED and p.partition == batch.partition}
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
    return BatchResult(result.batch, 0, 0, result.already_committed, result.snapshot_id, result.commit_seconds,
                       spilled=0 if result.already_committed else raw.num_rows, level=level,
                       lost=0 if result.already_committed else sum(end - start for start, end in lost))


def recover_range(kafka: KafkaResource, iceberg: IcebergResource, batch: OffsetRange, *, level: int = 0,
                  shedder: LoadShedder | None = None, spill_store: SpillStore | None = None,
                  before_commit: Callable[[], None] | None = None, max_attempts: int = 8) -> BatchResult:
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
        records, lost = [r for r in read.records if entry.is_missing(r["symbol"])], read.lost
    else:
        files = [f for f in spill_store.list(batch.topic, batch.partition) if (f.start, f.end) == (batch.start, batch.end)]
        read = decode_raw(spill_store.read(files[0])) if files else read_range(kafka, batch)
        records, dead, lost = read.records, read.dead_letters, read.lost
        send_dead_letters(kafka, batch, dead)
    gaps = sequence_gaps(records)
    enriched = not shedder.skip_enrichment(level)
    if enriched:
        enrich(records, shedder)
    arrow = _sorted(to_arrow(records, TRADES)) if records else to_arrow([], TRADES)
    for attempt in range(1, max_attempts + 1):
        table = iceberg.trades()
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
        seconds = _commit_once(table, arrow, summary, properties, before_commit, f"recovery of {entry.key}", attempt)
        if seconds is None:
            continue
        snapshot = table.current_snapshot()
        _delete_spilled(spill_store, batch)
        return BatchResult(batch, len(records), len(dead), False, snapshot.snapshot_id if snapshot else None, seconds,
                           enriched=enriched, level=level, sequence_gaps=gaps,
                           lost=sum(end - start for start, end in lost))
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
