"""The stream sensor's decisions: which runs to request this tick, at which degradation level.

Pure: a function of the tick's :class:`Observation`, the cursor and the settings. Ranges are
requested one in flight per partition and retried when their run fails or never appears;
pending (deferred, spilled) ranges get recovery runs at or below ``RECOVERY_MAX_LEVEL``; at
NORMAL with following on, one long-running follower replaces the runs per range.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from k2_resources.degradation.levels import DegradationLevel, DegradationManager, DegradationThresholds, Transition
from k2_resources.degradation.resource import DegradationResource
from k2_resources.sink.offsets import OffsetRange, PendingRange
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_cursor import RUN_ACTIVE, RUN_UNKNOWN, InFlight, Recovery, StreamCursor
from k2_sensors.binance.stream_observation import Observation, StreamOffsets

# Pending ranges are written back once the level is at most SOFT: at GRACEFUL tier-3 symbols are
# still shed, and spilled batches hold tier-3 rows too, so both kinds wait for the same level.
RECOVERY_MAX_LEVEL = DegradationLevel.SOFT


def retry_attempt(flight: InFlight, run_status: Mapping[str, str], retry_after_s: float, now: float) -> int | None:
    """The attempt to request ``flight``'s range again with, or None while it is still in flight.

    Called only while the range is not done (not committed, or still pending). Its run is in
    flight while active, or while it has not appeared yet and ``retry_after_s`` has not passed;
    otherwise (failed, vanished, or finished without committing) it is requested again, attempt + 1.
    """
    status = run_status.get(flight.run_key, RUN_UNKNOWN)
    if status == RUN_ACTIVE or (status == RUN_UNKNOWN and now - flight.requested_at <= retry_after_s):
        return None
    return flight.attempt + 1


def plan_batches(
    offsets: StreamOffsets,
    cursor: StreamCursor,
    max_batch_messages: int,
    run_status: Mapping[str, str],
    retry_after_s: float,
    now: float | None = None,
) -> list[tuple[OffsetRange, str, int]]:
    """The ranges to request now, as (range, run_key, attempt); updates ``cursor.in_flight``.

    At most one range per partition is in flight. A finished range is dropped once the table's
    committed offset reaches its end; a failed run (or one that never appeared within
    ``retry_after_s``) is requested again with a new run key.
    """
    now = time.time() if now is None else now
    requests: list[tuple[OffsetRange, str, int]] = []
    if offsets.mismatched:
        return requests  # never request batches for a topic whose offsets went backwards
    for partition in sorted(offsets.end_offsets):
        committed = offsets.committed.get(partition, 0)
        attempt = 1
        flight = cursor.in_flight.pop(partition, None)
        if flight is not None and committed < flight.end:
            retry = retry_attempt(flight, run_status, retry_after_s, now)
            if retry is None:
                cursor.in_flight[partition] = flight
                continue
            attempt = retry  # requested again from where the table is
        # Past a retention gap the range starts at the committed offset (its run records the lost
        # offsets) and reads up to a full batch from the log start.
        floor = max(committed, offsets.start_offsets.get(partition, 0))
        end = min(offsets.end_offsets[partition], floor + max_batch_messages)
        if end <= committed:
            continue
        batch = OffsetRange(offsets.topic, partition, committed, end)
        run_key = f"{batch.key}#{attempt}"
        cursor.in_flight[partition] = InFlight(committed, end, run_key, now, attempt)
        requests.append((batch, run_key, attempt))
    return requests


def batch_level(
    level: DegradationLevel, cursor: StreamCursor, changed_at: float | None, cooldown_s: float, now: float
) -> DegradationLevel | None:
    """The level new batches run at, or None when none may be requested now.

    At CIRCUIT_BREAK no batch is requested, except one probe round per cooldown (the breaker
    half-opens), run at AGGRESSIVE: spilling is the cheapest way to move the committed offsets,
    and without it a break caused by lag could never end (lag only falls when batches run).
    """
    if level < DegradationLevel.CIRCUIT_BREAK:
        return level
    last = max(changed_at or 0.0, cursor.probe_at or 0.0)
    if now - last < cooldown_s:
        return None
    return DegradationLevel.AGGRESSIVE


def note_probe(cursor: StreamCursor, now: float) -> None:
    """Remember that a half-open probe round was requested at ``now``."""
    cursor.probe_at = now


def plan_recoveries(
    offsets: StreamOffsets,
    cursor: StreamCursor,
    level: DegradationLevel,
    run_status: Mapping[str, str],
    retry_after_s: float,
    now: float | None = None,
) -> list[tuple[PendingRange, str, int]]:
    """Recovery runs to request now, oldest pending range first, one in flight per partition.

    Only at RECOVERY_MAX_LEVEL or below. A recovery is done once its range is no longer pending;
    a failed run (or one that never appeared) is requested again with a new run key (the retry
    rule of ``retry_attempt``). Updates ``cursor.recovering`` (partition -> the range in flight).
    """
    now = time.time() if now is None else now
    flights = cursor.recovering
    pending = {(p.partition, p.start, p.end): p for p in offsets.pending}
    requests: list[tuple[PendingRange, str, int]] = []
    for partition, held in list(flights.items()):
        if (partition, held.start, held.end) not in pending:
            del flights[partition]  # recovered
    if level > RECOVERY_MAX_LEVEL or offsets.mismatched:
        return requests
    for partition in sorted({p.partition for p in offsets.pending}):
        attempt = 1
        flight = flights.get(partition)
        if flight is not None:
            retry = retry_attempt(flight, run_status, retry_after_s, now)
            if retry is None:
                continue
            attempt = retry
            entry = pending[(partition, flight.start, flight.end)]
        else:
            entry = min((p for p in offsets.pending if p.partition == partition), key=lambda p: p.start)
        run_key = f"recover:{entry.range.key}#{attempt}"
        flights[partition] = Recovery(entry.start, entry.end, run_key, now, attempt, entry.kind)
        requests.append((entry, run_key, attempt))
    return requests


def recovery_run_keys(cursor: StreamCursor) -> list[str]:
    return [flight.run_key for flight in cursor.recovering.values()]


# -- the follower: one long-running run that commits every partition every second or so ------------


def follower_run_keys(cursor: StreamCursor) -> list[str]:
    return [] if cursor.follower is None else [cursor.follower.run_key]


def follower_busy(cursor: StreamCursor, run_status: Mapping[str, str], retry_after_s: float, now: float) -> bool:
    """Whether the cursor's follower is queued or running; one that finished, failed or never appeared
    within ``retry_after_s`` is forgotten (the sensor is its supervisor: it plans anew this tick)."""
    if cursor.follower is None:
        return False
    if retry_attempt(cursor.follower, run_status, retry_after_s, now) is None:
        return True
    cursor.follower = None
    return False


def wants_follower(
    offsets: StreamOffsets, cursor: StreamCursor, level: DegradationLevel, follow_seconds: float
) -> bool:
    """A follower instead of a run per range: when following is on, the level is NORMAL, there is new
    data, no range or recovery run is in flight (ranges already committed are dropped first), nothing
    is pending (deferred or spilled ranges go through recovery runs) and the topic's offsets are sane."""
    cursor.in_flight = {p: f for p, f in cursor.in_flight.items() if offsets.committed.get(p, 0) < f.end}
    return (
        follow_seconds > 0
        and level == DegradationLevel.NORMAL
        and offsets.total_lag > 0
        and not offsets.pending
        and not offsets.mismatched
        and not cursor.in_flight
        and not cursor.recovering
    )


# -- one tick as three steps: observe (I/O, in observe.py) -> decide (here) -> report (stream_checks) --

INGEST = "ingest"
RECOVER = "recover"
FOLLOW = "follow"


@dataclass(frozen=True)
class StreamSettings:
    """The configuration a tick decides and reports under (from the sink and degradation resources)."""

    topic: str
    max_batch_messages: int
    retry_after_s: float
    lag_warn_messages: int
    lag_error_messages: int
    thresholds: DegradationThresholds = field(default_factory=DegradationThresholds)
    follow_seconds: float = 0.0  # > 0: a follower at NORMAL instead of a run per range (TradeSinkResource)

    @classmethod
    def of(cls, sink: TradeSinkResource, degradation: DegradationResource) -> StreamSettings:
        return cls(
            topic=sink.topic,
            max_batch_messages=sink.max_batch_messages,
            retry_after_s=sink.run_retry_after_seconds,
            lag_warn_messages=sink.lag_warn_messages,
            lag_error_messages=sink.lag_error_messages,
            thresholds=degradation.thresholds(),
            follow_seconds=sink.follow_seconds,
        )


@dataclass(frozen=True)
class PlannedRun:
    """A run to request: one offset range, at a degradation level, to ingest or to recover; or the
    topic's follower (mode FOLLOW; its range is a placeholder: it follows every partition)."""

    range: OffsetRange
    run_key: str
    attempt: int
    level: DegradationLevel
    mode: str = INGEST


@dataclass(frozen=True)
class Decision:
    """What one tick decided: the next cursor, the runs to request, and the degradation state."""

    cursor: StreamCursor
    degradation: DegradationManager  # after this tick's evaluate (level, last_transition, history)
    runs: tuple[PlannedRun, ...] = ()
    probe: bool = False  # the batches are a half-open probe round of the circuit breaker

    @property
    def level(self) -> DegradationLevel:
        return self.degradation.level

    @property
    def transition(self) -> Transition | None:
        return self.degradation.last_transition

    @property
    def batches(self) -> tuple[PlannedRun, ...]:
        return tuple(run for run in self.runs if run.mode == INGEST)

    @property
    def recoveries(self) -> tuple[PlannedRun, ...]:
        return tuple(run for run in self.runs if run.mode == RECOVER)


def decide(observation: Observation, cursor: StreamCursor, settings: StreamSettings, now: float) -> Decision:
    """Set the degradation level, then plan batches (at that level, or a probe round) and recoveries.

    Pure: ``cursor`` is not changed; the next cursor is in the Decision.
    """
    cursor = copy.deepcopy(cursor)
    offsets = observation.offsets
    manager = DegradationManager.from_state(cursor.degradation, thresholds=settings.thresholds, clock=lambda: now)
    level = manager.evaluate(offsets.total_lag, observation.memory_percent)
    cursor.degradation = manager.to_state()

    runs: list[PlannedRun] = []
    probe = False
    run_level = batch_level(level, cursor, manager.changed_at, settings.thresholds.cooldown_seconds, now)
    following = follower_busy(cursor, observation.run_status, settings.retry_after_s, now)
    if run_level is not None and not following and wants_follower(offsets, cursor, level, settings.follow_seconds):
        run_key = f"follow:{offsets.topic}@{now:.3f}"
        cursor.follower = InFlight(0, 0, run_key, now)
        runs.append(PlannedRun(OffsetRange(offsets.topic, 0, 0, 0), run_key, 1, level, FOLLOW))
    elif run_level is not None and not following:
        planned = plan_batches(
            offsets, cursor, settings.max_batch_messages, observation.run_status, settings.retry_after_s, now
        )
        runs += [PlannedRun(batch, key, attempt, run_level) for batch, key, attempt in planned]
        if planned and level == DegradationLevel.CIRCUIT_BREAK:
            note_probe(cursor, now)
            probe = True
    recoveries = plan_recoveries(offsets, cursor, level, observation.run_status, settings.retry_after_s, now)
    runs += [PlannedRun(entry.range, key, attempt, level, RECOVER) for entry, key, attempt in recoveries]
    return Decision(cursor, manager, tuple(runs), probe)
