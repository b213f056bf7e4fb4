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


def reset_baseline(table: Table, topic: str, offsets: dict[int, int]) -> list["PendingRange"]:
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
    with table.transaction() as transaction:
        transaction.set_properties({committed_key(topic): committed_json,
                                    f"{PREFIX}.baseline-reset.{topic}": committed_json,
                                    **pending_properties(topic, kept)})
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

    def same_range(self, other: "PendingRange") -> bool:
        return (self.topic, self.partition, self.start, self.end, self.kind) == (
            other.topic, other.partition, other.start, other.end, other.kind)

    def to_dict(self) -> dict:
        data: dict = {"partition": self.partition, "start": self.start, "end": self.end, "kind": self.kind}
        if self.kind == DEFERRED:
            data["symbols"] = list(self.symbols)
        data["rows"] = self.rows
        return data

    @classmethod
    def from_dict(cls, topic: str, data: dict) -> "PendingRange":
        return cls(topic, int(data["partition"]), int(data["start"]), int(data["end"]), str(data["kind"]),
                   tuple(sorted(str(s) for s in data.get("symbols", ()))), int(data.get("rows", 0)))


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
