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

This module runs the steps; each lives in its own module: ``range_read`` (the exact read of a
range), ``decode`` (decoding and screening), ``offset_commit`` (the offset-checked commit, through
the catalog's commit layer), ``kafka_outputs`` (dead letters and the consumer group), ``enrich``
and ``gaps_and_shedding``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pyarrow as pa
from pyiceberg.table import Table

from k2_resources.catalog.commit import MAX_ATTEMPTS
from k2_resources.catalog.data_files import WrittenRows
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.shedding import LoadShedder
from k2_resources.degradation.spill import SpillStore
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.enrich import enrich_rows
from k2_resources.sink.gaps_and_shedding import sequence_gaps_of, split_rows, symbol_mask
from k2_resources.sink.kafka_outputs import commit_consumer_group, send_dead_letters
from k2_resources.sink.offset_commit import BatchResult, as_rows, commit_range, commit_rows, record_losses
from k2_resources.sink.offsets import (
    DEFERRED,
    PREFIX,
    SPILLED,
    OffsetRange,
    PendingRange,
    committed_key,
    committed_offsets,
    pending_properties,
    pending_ranges,
)
from k2_resources.sink.range_read import decode_raw, read_range, read_raw_range


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
    max_attempts: int = MAX_ATTEMPTS,
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
    rows, dead, lost = _pending_rows(kafka, batch, entry, spill_store)
    gaps = sequence_gaps_of(rows)
    enriched = not shedder.skip_enrichment(level)
    if enriched:
        rows = enrich_rows(rows, shedder)
    written = WrittenRows(as_rows(rows))

    def plan(table: Table) -> tuple[dict[str, str], dict[str, str]] | None:
        pending = pending_ranges(table, batch.topic)
        if not any(p.same_range(entry) for p in pending):
            return None
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
            record_losses(table, batch, lost, summary, properties)
        return summary, properties

    what = f"recovery of {entry.key}"
    committed = commit_rows(iceberg, written, what, plan, before_commit=before_commit, max_attempts=max_attempts)
    _delete_spilled(spill_store, batch)
    if committed is None:
        return BatchResult(batch, 0, len(dead), True, None, 0.0, level=level)
    seconds, snapshot_id = committed
    return BatchResult(
        batch,
        written.num_rows,
        len(dead),
        False,
        snapshot_id,
        seconds,
        enriched=enriched,
        level=level,
        sequence_gaps=gaps,
        lost=sum(end - start for start, end in lost),
    )


def _pending_rows(
    kafka: KafkaResource, batch: OffsetRange, entry: PendingRange, spill_store: SpillStore
) -> tuple[pa.Table, list[tuple[int, bytes, str]], list[tuple[int, int]]]:
    """(rows, dead letters, lost offsets) of a pending range, read again."""
    if entry.kind == DEFERRED:
        # The first pass already dead-lettered this range's undecodable and unstorable messages.
        read = read_range(kafka, batch)
        return read.rows.filter(symbol_mask(read.rows.column("symbol"), entry.is_missing)), [], read.lost
    files = [f for f in spill_store.list(batch.topic, batch.partition) if (f.start, f.end) == (batch.start, batch.end)]
    read = decode_raw(spill_store.read(files[0])) if files else read_range(kafka, batch)
    send_dead_letters(kafka, batch, read.dead_letters)
    return read.rows, read.dead_letters, read.lost


def _find_pending(iceberg: IcebergResource, batch: OffsetRange) -> PendingRange | None:
    for entry in pending_ranges(iceberg.trades(), batch.topic):
        if (entry.partition, entry.start, entry.end) == (batch.partition, batch.start, batch.end):
            return entry
    return None


def _delete_spilled(spill_store: SpillStore, batch: OffsetRange) -> None:
    for spilled in spill_store.list(batch.topic, batch.partition):
        if (spilled.start, spilled.end) == (batch.start, batch.end):
            spill_store.delete(spilled)
