"""What one tick of the stream sensor observed, as values: the rules decide and report on these.

``StreamOffsets`` is the topic's and the table's offsets (log start and end, committed,
pending ranges, recorded retention losses) with what follows from them (lag, a recreated
topic, a retention gap); ``Observation`` is everything one tick reads. Both are built by
:mod:`k2_sensors.binance.observe` (the reads); nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from k2_resources.sink.offsets import PendingRange, RetentionLoss


@dataclass(frozen=True)
class StreamOffsets:
    """Where the topic ends, where the table's committed offsets are (per partition), which
    ranges below them are pending (deferred or spilled by load shedding), where the topic's log
    starts (the oldest offset Kafka still holds) and the retention losses the table recorded."""

    topic: str
    end_offsets: dict[int, int]
    committed: dict[int, int]
    pending: tuple[PendingRange, ...] = ()
    start_offsets: dict[int, int] = field(default_factory=dict)
    losses: tuple[RetentionLoss, ...] = ()

    def pending_of(self, kind: str) -> list[PendingRange]:
        return [p for p in self.pending if p.kind == kind]

    def lag(self, partition: int) -> int:
        return max(0, self.end_offsets.get(partition, 0) - self.committed.get(partition, 0))

    @property
    def total_lag(self) -> int:
        return sum(self.lag(p) for p in self.end_offsets)

    @property
    def mismatched(self) -> dict[int, tuple[int, int]]:
        """Partitions whose end offset is below the table's committed offset: (end, committed)."""
        found = {
            p: (self.end_offsets.get(p, 0), c) for p, c in self.committed.items() if self.end_offsets.get(p, 0) < c
        }
        return dict(sorted(found.items()))

    @property
    def retention_gaps(self) -> dict[int, tuple[int, int]]:
        """Partitions whose log start passed the table's committed offset: the lost range (committed, log start).

        Told apart from a recreated topic (``mismatched``: the end is below the committed offset):
        here the topic is the same, Kafka deleted offsets the table had not committed yet.
        """
        if self.mismatched:
            return {}
        found = {
            p: (self.committed.get(p, 0), start)
            for p, start in self.start_offsets.items()
            if start > self.committed.get(p, 0)
        }
        return dict(sorted(found.items()))

    @property
    def unacknowledged_losses(self) -> list[RetentionLoss]:
        return [loss for loss in self.losses if not loss.acknowledged]


@dataclass(frozen=True)
class Observation:
    """Everything one tick reads from outside, so that decide and report need no I/O."""

    offsets: StreamOffsets
    run_status: Mapping[str, str] = field(default_factory=dict)  # run key -> RUN_* (the cursor's in-flight keys)
    memory_percent: float = 0.0
    dead_letter_topic: str = ""
    dead_letters: int = 0  # messages ever written to the dead-letter topic
    batch_gaps: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # see sequence_gap_evaluation
    gap_ledger: Mapping[str, Any] = field(default_factory=dict)  # the streamer's gap fill, GapSummary.metadata()
    spill_files: Mapping[str, int] = field(default_factory=dict)  # SpillStore.backlog()
