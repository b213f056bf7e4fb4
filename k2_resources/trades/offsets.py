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


def reset_baseline(table: Table, topic: str, offsets: dict[int, int]) -> None:
    """Declare that the table holds ``topic`` up to ``offsets`` (the operator's new baseline).

    Used after the topic or the cluster was recreated and its offsets restarted lower than
    the table's: from now on, ranges are counted from the new baseline.
    """
    committed_json = json.dumps({str(p): o for p, o in sorted(offsets.items())})
    with table.transaction() as transaction:
        transaction.set_properties({committed_key(topic): committed_json,
                                    f"{PREFIX}.baseline-reset.{topic}": committed_json})
    table.refresh()
