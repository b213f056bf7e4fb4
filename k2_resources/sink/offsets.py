"""Which Kafka offsets an Iceberg table already holds.

Every commit that comes from Kafka records, in its snapshot summary (as the Iceberg Kafka
Connect sink does), the range it covers and the committed end offset of every partition of
the topic as of that commit::

    k2.kafka.topic            market.trades.binance
    k2.kafka.partition        0
    k2.kafka.start-offset     1200      (first offset in the batch)
    k2.kafka.end-offset       1700      (one past the last offset)
    k2.kafka.committed.<topic>  {"0": 1700, "1": 950}

The same committed map is kept in a table property of the same name, written in the same
transaction (so in the same metadata file as the snapshot). The property is the authority
for the current state: it survives snapshot expiry and an operator's baseline reset; the
summaries say what each snapshot held, for time travel and audit. The table therefore says
exactly what it holds: everything below ``committed[p]`` for each partition ``p``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from k2_resources.catalog.pyiceberg_adapter import transaction_of

PREFIX = "k2.kafka"


def committed_key(topic: str) -> str:
    return f"{PREFIX}.committed.{topic}"


@dataclass(frozen=True)
class OffsetRange:
    """Offsets [start, end) of one topic partition."""

    topic: str
    partition: int
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"bad offset range {self.start}..{self.end}")

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def key(self) -> str:
        return f"{self.topic}-{self.partition}-{self.start}-{self.end}"


def _parse(raw: str) -> dict[int, int]:
    return {int(partition): int(offset) for partition, offset in json.loads(raw).items()}


def snapshot_committed_offsets(table: Table, snapshot: Snapshot | None, topic: str) -> dict[int, int]:
    """Committed end offsets per partition as of ``snapshot`` (walking back to the last Kafka commit)."""
    key = committed_key(topic)
    current = snapshot
    while current is not None:
        summary = current.summary
        if summary is not None and key in summary.additional_properties:
            return _parse(summary.additional_properties[key])
        current = table.snapshot_by_id(current.parent_snapshot_id) if current.parent_snapshot_id else None
    return {}


def committed_offsets(table: Table, topic: str) -> dict[int, int]:
    """Committed end offsets per partition in the table's current state (empty: nothing yet)."""
    raw = table.properties.get(committed_key(topic))
    if raw:
        return _parse(raw)
    return snapshot_committed_offsets(table, table.current_snapshot(), topic)


def commit_properties(batch: OffsetRange, committed_after: dict[int, int]) -> tuple[dict[str, str], dict[str, str]]:
    """(snapshot summary properties, table properties) recording ``batch`` as committed."""
    committed_json = json.dumps({str(p): o for p, o in sorted(committed_after.items())})
    summary = {
        f"{PREFIX}.topic": batch.topic,
        f"{PREFIX}.partition": str(batch.partition),
        f"{PREFIX}.start-offset": str(batch.start),
        f"{PREFIX}.end-offset": str(batch.end),
        committed_key(batch.topic): committed_json,
    }
    return summary, {committed_key(batch.topic): committed_json}


def reset_baseline(table: Table, topic: str, offsets: dict[int, int]) -> list[PendingRange]:
    """Declare that the table holds ``topic`` up to ``offsets`` (the operator's new baseline).

    Used after the topic or the cluster was recreated and its offsets restarted lower than
    the table's: from now on, ranges are counted from the new baseline. Deferred ranges
    pointed into the old topic and cannot be read again: they are dropped and returned so
    the operator sees what was lost. Spilled ranges stay: their rows are in the spill files.
    """
    pending = pending_ranges(table, topic)
    kept = [p for p in pending if p.kind == SPILLED]
    dropped = [p for p in pending if p.kind != SPILLED]
    committed_json = json.dumps({str(p): o for p, o in sorted(offsets.items())})
    with transaction_of(table) as transaction:
        transaction.set_properties(
            {
                committed_key(topic): committed_json,
                f"{PREFIX}.baseline-reset.{topic}": committed_json,
                **pending_properties(topic, kept),
            }
        )
    table.refresh()
    return dropped


# -- pending ranges: below the committed offsets but not (wholly) in the table yet ---------------
#
# Load shedding advances the committed offsets without writing every row: at GRACEFUL the rows of
# tier-3 symbols are deferred, at AGGRESSIVE a whole raw batch is spilled to local Parquet. The
# commit that advances the offsets records such a range as pending, in the same transaction, in a
# table property (the authority) and in the snapshot summary (history)::
#
#     k2.kafka.pending.<topic>   [{"partition": 0, "start": 1200, "end": 1700, "kind": "deferred",
#                                  "symbols": ["PEPEUSDT"], "rows": 37},
#                                 {"partition": 1, "start": 950, "end": 1450, "kind": "spilled", "rows": 500}]
#
# A "deferred" entry means: the rows of ``symbols`` in [start, end) are not in the table (every
# other row of the range is). A "spilled" entry means: no row of [start, end) is in the table;
# the raw batch is in K2_HOME/spill (and still in Kafka while retained). The recovery commit
# appends the missing rows and removes the entry in one transaction, so a range is recovered
# exactly once. Readers (the hybrid query) read the missing rows of pending ranges from Kafka.

DEFERRED = "deferred"
SPILLED = "spilled"
PENDING_KINDS = (DEFERRED, SPILLED)


def pending_key(topic: str) -> str:
    return f"{PREFIX}.pending.{topic}"


@dataclass(frozen=True)
class PendingRange:
    """Offsets [start, end) of one partition whose rows (all, or those of ``symbols``) are not in the table yet."""

    topic: str
    partition: int
    start: int
    end: int
    kind: str  # DEFERRED or SPILLED
    symbols: tuple[str, ...] = ()  # DEFERRED: the symbols whose rows are missing
    rows: int = 0  # rows missing from the table (for backlog checks and metrics)

    def __post_init__(self) -> None:
        if self.kind not in PENDING_KINDS:
            raise ValueError(f"unknown pending kind {self.kind!r}; expected one of {PENDING_KINDS}")
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"bad pending range {self.start}..{self.end}")

    @property
    def range(self) -> OffsetRange:
        return OffsetRange(self.topic, self.partition, self.start, self.end)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.range.key}"

    def is_missing(self, symbol: str) -> bool:
        """True when a row of ``symbol`` read from this range is not in the table."""
        return self.kind == SPILLED or symbol in self.symbols

    def same_range(self, other: PendingRange) -> bool:
        return (self.topic, self.partition, self.start, self.end, self.kind) == (
            other.topic,
            other.partition,
            other.start,
            other.end,
            other.kind,
        )

    def to_dict(self) -> dict:
        data: dict = {"partition": self.partition, "start": self.start, "end": self.end, "kind": self.kind}
        if self.kind == DEFERRED:
            data["symbols"] = list(self.symbols)
        data["rows"] = self.rows
        return data

    @classmethod
    def from_dict(cls, topic: str, data: dict) -> PendingRange:
        return cls(
            topic,
            int(data["partition"]),
            int(data["start"]),
            int(data["end"]),
            str(data["kind"]),
            tuple(sorted(str(s) for s in data.get("symbols", ()))),
            int(data.get("rows", 0)),
        )


def _pending_json(pending: list[PendingRange]) -> str:
    ordered = sorted(pending, key=lambda p: (p.partition, p.start, p.kind))
    return json.dumps([p.to_dict() for p in ordered])


def _parse_pending(topic: str, raw: str) -> list[PendingRange]:
    return [PendingRange.from_dict(topic, item) for item in json.loads(raw)]


def snapshot_pending_ranges(table: Table, snapshot: Snapshot | None, topic: str) -> list[PendingRange]:
    """Pending ranges as of ``snapshot`` (walking back to the last commit that recorded them)."""
    key = pending_key(topic)
    current = snapshot
    while current is not None:
        summary = current.summary
        if summary is not None and key in summary.additional_properties:
            return _parse_pending(topic, summary.additional_properties[key])
        current = table.snapshot_by_id(current.parent_snapshot_id) if current.parent_snapshot_id else None
    return []


def pending_ranges(table: Table, topic: str) -> list[PendingRange]:
    """Ranges below the committed offsets whose rows are (partly) not in the table's current state.

    For an exact read of the topic, take the table, plus from Kafka: everything at or above the
    committed offsets, and within each pending range the rows for which ``is_missing(symbol)``.
    """
    raw = table.properties.get(pending_key(topic))
    if raw is not None:
        return _parse_pending(topic, raw)
    return snapshot_pending_ranges(table, table.current_snapshot(), topic)


def pending_properties(topic: str, pending: list[PendingRange]) -> dict[str, str]:
    """The property (and summary entry) recording ``pending`` as the topic's pending ranges."""
    return {pending_key(topic): _pending_json(pending)}


# -- retention losses: offsets Kafka deleted before the table committed them ---------------------
#
# When Kafka's retention (or an operator's delete-records) moves a partition's log start past the
# table's committed offset, the messages in [committed, log start) are gone from Kafka without
# ever reaching the table. The micro-batch that meets this commits the skip in the same snapshot
# that moves the committed offset past it, and records the loss (audit trail, for ever) in the
# snapshot summary and in a table property, so that snapshot expiry does not erase it::
#
#     k2.kafka.retention-loss            {"partition": 0, "start": 120, "end": 180, "count": 60,
#                                          "recorded_at": "2026-11-30T03:12:00+00:00"}   (summary only)
#     k2.kafka.losses.<topic>            [every loss of the topic, with its acknowledgement if any]
#
# A loss stays unacknowledged (and the ``retention_loss`` check ERROR) until an operator runs
# `k2 offsets accept-loss`, which adds who, when and why to each entry in one more commit.

LOSS_SUMMARY_KEY = f"{PREFIX}.retention-loss"
LOSS_ACKNOWLEDGED_KEY = f"{PREFIX}.retention-loss-acknowledged"


def losses_key(topic: str) -> str:
    return f"{PREFIX}.losses.{topic}"


@dataclass(frozen=True)
class RetentionLoss:
    """Offsets [start, end) of one partition that Kafka deleted before the table committed them."""

    topic: str
    partition: int
    start: int
    end: int
    recorded_at: str = ""  # ISO 8601 UTC: when the skip was committed
    acknowledged_at: str | None = None
    acknowledged_by: str | None = None
    note: str | None = None  # the operator's reason, given with the acknowledgement

    def __post_init__(self) -> None:
        if self.start < 0 or self.end <= self.start:
            raise ValueError(f"bad lost range {self.start}..{self.end}")

    @property
    def count(self) -> int:
        return self.end - self.start

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_at is not None

    def describe(self) -> str:
        return (
            f"partition {self.partition}: offsets [{self.start}, {self.end}) ({self.count} messages) "
            f"deleted by Kafka retention before market.trades committed them"
        )

    def to_dict(self) -> dict:
        data: dict = {
            "partition": self.partition,
            "start": self.start,
            "end": self.end,
            "count": self.count,
            "recorded_at": self.recorded_at,
        }
        if self.acknowledged_at is not None:
            data.update(acknowledged_at=self.acknowledged_at, acknowledged_by=self.acknowledged_by, note=self.note)
        return data

    @classmethod
    def from_dict(cls, topic: str, data: dict) -> RetentionLoss:
        return cls(
            topic,
            int(data["partition"]),
            int(data["start"]),
            int(data["end"]),
            str(data.get("recorded_at", "")),
            data.get("acknowledged_at"),
            data.get("acknowledged_by"),
            data.get("note"),
        )


def retention_losses(table: Table, topic: str) -> list[RetentionLoss]:
    """Every retention loss recorded for ``topic`` (acknowledged or not), oldest first."""
    raw = table.properties.get(losses_key(topic))
    if not raw:
        return []
    return [RetentionLoss.from_dict(topic, item) for item in json.loads(raw)]


def loss_properties(topic: str, losses: list[RetentionLoss]) -> dict[str, str]:
    """The table property recording ``losses`` as the topic's loss history."""
    ordered = sorted(losses, key=lambda loss: (loss.recorded_at, loss.partition, loss.start))
    return {losses_key(topic): json.dumps([loss.to_dict() for loss in ordered])}


def acknowledge_losses(table: Table, topic: str, by: str, note: str, at: str) -> list[RetentionLoss]:
    """Mark every unacknowledged loss of ``topic`` as accepted by ``by`` (with ``note``) in one commit.

    The commit is an empty append whose summary names the acknowledged ranges, so the history of
    snapshots shows who accepted which loss and when; returns the losses acknowledged now.
    """
    losses = retention_losses(table, topic)
    open_losses = [loss for loss in losses if not loss.acknowledged]
    if not open_losses:
        return []
    updated = [
        loss
        if loss.acknowledged
        else RetentionLoss(loss.topic, loss.partition, loss.start, loss.end, loss.recorded_at, at, by, note)
        for loss in losses
    ]
    properties = loss_properties(topic, updated)
    committed = committed_offsets(table, topic)
    summary = {
        f"{PREFIX}.topic": topic,
        committed_key(topic): json.dumps({str(p): o for p, o in sorted(committed.items())}),
        LOSS_ACKNOWLEDGED_KEY: json.dumps(
            {"by": by, "note": note, "at": at, "ranges": [loss.to_dict() for loss in open_losses]}
        ),
        **properties,
    }
    with transaction_of(table) as transaction:
        transaction.append(table.schema().as_arrow().empty_table(), snapshot_properties=summary)
        transaction.set_properties(properties)
    table.refresh()
    return [
        loss
        for loss in updated
        if loss.acknowledged_at == at
        and loss.acknowledged_by == by
        and any((o.partition, o.start) == (loss.partition, loss.start) for o in open_losses)
    ]
