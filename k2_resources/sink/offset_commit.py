"""The offset-checked commit: a range's rows and its committed offsets in ONE Iceberg commit.

Before writing, and again on every attempt, the table's committed offsets decide:

- ``committed >= end``: the range is already in the table -> nothing is written;
- ``committed == start``: the range is next -> append it;
- anything else: a gap or an overlap -> refuse (OffsetGapError) naming both ranges.

Every commit here is an Iceberg append (an empty one when there are no rows), so it makes a
snapshot whose summary records the range, and pyiceberg's snapshot-id requirement makes
concurrent commits (another partition, a recovery) conflict and retry through the commit layer
(:mod:`k2_resources.catalog.commit`) instead of overwriting each other's offset and pending
properties. A retry re-checks the offsets and re-commits the metadata with the Parquet files the
first attempt wrote (:class:`~k2_resources.catalog.data_files.WrittenRows`), so partitions that
commit at the same time do not rewrite their data.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
from pyiceberg.table import Table

from k2_resources import metrics
from k2_resources.catalog.commit import (
    MAX_ATTEMPTS,
    ensure_no_blind_retries,
    refresh_after_commit,
    with_commit_retries,
)
from k2_resources.catalog.data_files import WrittenRows
from k2_resources.catalog.pyiceberg_adapter import append_data_files, transaction_of
from k2_resources.catalog.resource import IcebergResource, to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.sink.errors import OffsetGapError
from k2_resources.sink.offsets import (
    LOSS_SUMMARY_KEY,
    OffsetRange,
    PendingRange,
    RetentionLoss,
    commit_properties,
    committed_offsets,
    loss_properties,
    pending_properties,
    pending_ranges,
    retention_losses,
)

log = logging.getLogger(__name__)

# What a commit records besides its rows: (snapshot summary, table properties), or None when the
# table already holds what the commit would add.
Plan = Callable[[Table], tuple[dict[str, str], dict[str, str]] | None]


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


def commit_rows(
    iceberg: IcebergResource,
    written: WrittenRows,
    what: str,
    plan: Plan,
    *,
    before_commit: Callable[[], None] | None = None,
    max_attempts: int = MAX_ATTEMPTS,
    gave_up: str = "run it again",
) -> tuple[float, int | None] | None:
    """Append ``written``'s rows to market.trades with what ``plan`` (called on the freshly loaded
    table of each attempt) says to record, through the commit layer; (seconds, snapshot id), or
    None when the plan found nothing to commit."""

    def attempt(_: int) -> tuple[float, int | None] | None:
        table = iceberg.trades()
        ensure_no_blind_retries(table)
        planned = plan(table)
        if planned is None:
            return None
        summary, properties = planned
        seconds = _commit_once(table, written, summary, properties, before_commit)
        snapshot = table.current_snapshot()
        return seconds, snapshot.snapshot_id if snapshot else None

    return with_commit_retries(attempt, what, max_attempts=max_attempts, gave_up=gave_up)


def commit_range(
    iceberg: IcebergResource,
    batch: OffsetRange,
    records: list[dict] | pa.Table,
    max_attempts: int = MAX_ATTEMPTS,
    before_commit: Callable[[], None] | None = None,
    pending: PendingRange | None = None,
    lost: list[tuple[int, int]] | tuple[tuple[int, int], ...] = (),
) -> BatchResult:
    """Append ``records`` (rows of market.trades' Arrow schema, or record dicts; all of ``batch``
    except the rows ``pending`` says are missing) to market.trades in one commit, exactly once;
    ``pending`` and the retention losses ``lost`` (offset ranges of the batch Kafka had deleted)
    are recorded in the same commit."""
    written = WrittenRows(as_rows(records))

    def plan(table: Table) -> tuple[dict[str, str], dict[str, str]] | None:
        committed = committed_offsets(table, batch.topic)
        done = committed.get(batch.partition, 0)
        if done >= batch.end:
            return None
        if done != batch.start:
            raise OffsetGapError(
                f"{batch.key} does not start where market.trades ends for {batch.topic}[{batch.partition}] "
                f"(committed up to offset {done}); run the range starting at {done} first, or if the topic was "
                "recreated set a new baseline with `k2 offsets reset --topic <topic>`"
            )
        summary, properties = commit_properties(batch, {**committed, batch.partition: batch.end})
        if pending is not None:
            pending_after = pending_properties(batch.topic, [*pending_ranges(table, batch.topic), pending])
            summary.update(pending_after)
            properties.update(pending_after)
        if lost:
            record_losses(table, batch, lost, summary, properties)
        return summary, properties

    committed = commit_rows(
        iceberg,
        written,
        batch.key,
        plan,
        before_commit=before_commit,
        max_attempts=max_attempts,
        gave_up="the table is under heavy concurrent writes, run the batch again",
    )
    if committed is None:
        return BatchResult(batch, 0, 0, True, None, 0.0)
    seconds, snapshot_id = committed
    return BatchResult(batch, written.num_rows, 0, False, snapshot_id, seconds)


def record_losses(
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


def _commit_once(
    table: Table,
    written: WrittenRows,
    summary: dict[str, str],
    properties: dict[str, str],
    before_commit: Callable[[], None] | None,
) -> float:
    """One commit attempt: rows and offset properties in one transaction; its seconds.

    Always an append (possibly empty): a snapshot records the range, and its snapshot-id
    requirement makes a concurrent commit conflict instead of racing. A conflict or a busy catalog
    propagates to the commit layer, which retries.
    """
    started = time.perf_counter()
    if before_commit is not None:
        before_commit()
    data_files = written.data_files(table)
    with transaction_of(table) as transaction:
        append_data_files(transaction, summary, data_files)
        transaction.set_properties(properties)
    seconds = time.perf_counter() - started
    metrics.ICEBERG_COMMIT_SECONDS.observe(seconds)
    metrics.MICROBATCH_MESSAGES.inc(written.num_rows)
    refresh_after_commit(table)
    return seconds


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("symbol", "ascending"), ("timestamp", "ascending")])


def as_rows(records: list[dict] | pa.Table) -> pa.Table:
    """Rows to append, in the table's sort order (symbol, then time)."""
    empty = TRADES.arrow_schema().empty_table()
    if isinstance(records, pa.Table):
        return _sorted(records.cast(TRADES.arrow_schema())) if records.num_rows else empty
    return _sorted(to_arrow(records, TRADES)) if records else empty
