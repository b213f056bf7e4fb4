"""Following a topic: one long-running consumer that commits each partition's new offsets every second or so.

Why: under `k2 run` every micro-batch is a Dagster run, and starting a run (a new process that
imports Dagster and the code location) costs seconds on an idle two-core machine and over a
minute on a loaded one, on top of the sensor's 5 s tick (docs/cost-model.md has the figures). A
follower pays the launch once and then commits every ``interval_s``.

Each cycle is the same exactly-once micro-batch as a run of its own: per partition, the range
``[committed, end)`` (at most ``max_batch_messages``) is read and committed by ``run_microbatch``,
whose commit records the range in the snapshot and refuses gaps and overlaps. A follower killed
at any point leaves the table exact; whoever comes next starts from the committed offsets.

A follower only works at the level it was started at and hands control back to the stream sensor
(by returning) when the sensor's rules could want something else: when it falls ``max_lag_messages``
behind (a burst: the sensor's degradation levels and bounded batches take over), when memory
reaches ``memory_limit_percent`` (the SOFT trigger), when a partition's end offset is below the
table's (a recreated topic: the sensor's baseline check stops everything), or after ``run_for_s``
(so a queued maintenance run or new code gets its turn).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import system_memory_percent
from k2_resources.degradation.shedding import LoadShedder
from k2_resources.degradation.spill import SpillStore
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import BatchResult, run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets

# How often a follower records its commits in Dagster (one materialisation per window, all partitions),
# and how long `k2 run`'s follower runs before handing back (its result closes the last window): each
# event of the last 7 days costs the asset page, 168 a week at these (docs/operations.md, "Dagster
# history of the stream"; bench_soak.py).
REPORT_SECONDS = 3600.0
K2_RUN_FOLLOW_SECONDS = 3600.0

ROTATED = "ran its time"
BEHIND = "fell behind"
MEMORY = "memory at the SOFT trigger"
RECREATED = "topic offsets below the table's"
STOPPED = "asked to stop"


@dataclass(frozen=True)
class FollowSettings:
    """How a follower paces itself and when it hands back to the sensor (see the module docstring)."""

    interval_s: float = 1.0
    run_for_s: float = 600.0
    max_batch_messages: int = 50_000
    max_lag_messages: int = 50_000
    memory_limit_percent: float = 70.0


@dataclass
class FollowOutcome:
    """What a follower did: its commits, the rows they wrote, and why it ended."""

    commits: int = 0
    rows_written: int = 0
    reason: str = ""
    ranges: list[str] = field(default_factory=list)


def plan_cycle(
    topic: str, starts: dict[int, int], ends: dict[int, int], committed: dict[int, int], max_batch_messages: int
) -> list[OffsetRange]:
    """The range of each partition with new offsets: from the committed offset, at most a batch
    (past a retention gap the range still starts at the committed offset: its commit records the loss)."""
    ranges = []
    for partition in sorted(ends):
        done = committed.get(partition, 0)
        floor = max(done, starts.get(partition, 0))
        end = min(ends[partition], floor + max_batch_messages)
        if end > done:
            ranges.append(OffsetRange(topic, partition, done, end))
    return ranges


def follow_topic(
    kafka: KafkaResource,
    iceberg: IcebergResource,
    topic: str,
    settings: FollowSettings,
    on_commit: Callable[[BatchResult], None],
    *,
    level: int = 0,
    shedder: LoadShedder | None = None,
    spill_store: SpillStore | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    memory_percent: Callable[[], float] = system_memory_percent,
    clock: Callable[[], float] = time.monotonic,
    pause: Callable[[float], Any] = time.sleep,
) -> FollowOutcome:
    """Commit every partition's new offsets of ``topic`` each ``settings.interval_s`` until a reason to
    stop (module docstring); ``on_commit`` gets each micro-batch's result (the caller reports it)."""
    outcome = FollowOutcome()
    ends_by = clock() + settings.run_for_s
    consumer = kafka.consumer()
    try:
        while True:
            cycle_started = clock()
            starts, ends = kafka.offset_bounds(topic)
            committed = committed_offsets(iceberg.trades(), topic)
            if any(ends.get(p, 0) < c for p, c in committed.items()):
                outcome.reason = RECREATED
                return outcome
            behind = 0
            for batch in plan_cycle(topic, starts, ends, committed, settings.max_batch_messages):
                result = run_microbatch(
                    kafka, iceberg, batch, level=level, shedder=shedder, spill_store=spill_store, consumer=consumer
                )
                behind += ends[batch.partition] - batch.end
                if not result.already_committed:
                    outcome.commits += 1
                    outcome.rows_written += result.written
                    outcome.ranges.append(batch.key)
                on_commit(result)
            for reason, due in (
                (STOPPED, should_stop()),
                (BEHIND, behind >= settings.max_lag_messages),
                (MEMORY, memory_percent() >= settings.memory_limit_percent),
                (ROTATED, clock() >= ends_by),
            ):
                if due:
                    outcome.reason = reason
                    return outcome
            pause(max(0.0, settings.interval_s - (clock() - cycle_started)))  # pacing the next cycle
    finally:
        consumer.close()
