"""The stream sensor's rules, as pure functions of what a tick observed and the sensor's cursor.

Kept apart from the Dagster sensor so every rule (which ranges to request, when a range is
in flight or retried, when lag or a baseline mismatch fails a check) is unit-testable without
Kafka. A tick is observe (I/O, in ``stream_sensor``) -> ``decide`` -> ``report``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from dagster import AssetCheckSeverity

from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import (
    DegradationLevel,
    DegradationManager,
    DegradationThresholds,
    Transition,
    check_status,
    describe_level,
)
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import (
    DEFERRED,
    SPILLED,
    OffsetRange,
    PendingRange,
    RetentionLoss,
    committed_offsets,
    pending_ranges,
    retention_losses,
)
from k2_resources.sink.resource import TradeSinkResource


@dataclass(frozen=True)
class StreamSnapshot:
    """Where the topic ends, where the table's committed offsets are (per partition), which
    ranges below them are pending (deferred or spilled by load shedding), where the topic's log
    starts (the oldest offset Kafka still holds) and the retention losses the table recorded."""

    topic: str
    end_offsets: dict[int, int]
    committed: dict[int, int]
    pending: tuple[PendingRange, ...] = ()
    start_offsets: dict[int, int] = field(default_factory=dict)
    losses: tuple[RetentionLoss, ...] = ()

    @classmethod
    def read(cls, kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> StreamSnapshot:
        starts, ends = kafka.offset_bounds(topic)
        table = iceberg.trades()
        return cls(
            topic,
            ends,
            committed_offsets(table, topic),
            tuple(pending_ranges(table, topic)),
            starts,
            tuple(retention_losses(table, topic)),
        )

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
class CheckOutcome:
    """One asset-check verdict, ready to become an AssetCheckEvaluation or AssetCheckResult."""

    check_name: str
    passed: bool
    severity: AssetCheckSeverity
    metadata: dict[str, Any]


def lag_evaluation(snapshot: StreamSnapshot, sink: Any) -> CheckOutcome:
    """Consumer lag: passes below the WARN threshold; WARN, then ERROR at the ERROR threshold."""
    lag = snapshot.total_lag
    severity = AssetCheckSeverity.ERROR if lag >= sink.lag_error_messages else AssetCheckSeverity.WARN
    return CheckOutcome(
        "consumer_lag",
        passed=lag < sink.lag_warn_messages,
        severity=severity,
        metadata={
            "lag_messages": lag,
            "warn_threshold": sink.lag_warn_messages,
            "error_threshold": sink.lag_error_messages,
            "per_partition": json.dumps({str(p): snapshot.lag(p) for p in sorted(snapshot.end_offsets)}),
        },
    )


def baseline_evaluation(snapshot: StreamSnapshot) -> CheckOutcome:
    """ERROR when the topic's offsets are lower than what the table says it committed."""
    mismatched = snapshot.mismatched
    metadata: dict[str, Any] = {"topic": snapshot.topic}
    if mismatched:
        metadata["mismatch"] = "; ".join(
            f"partition {p}: topic ends at {end} but market.trades committed up to {committed}"
            for p, (end, committed) in mismatched.items()
        )
        metadata["fix"] = (
            f"the topic or the Kafka cluster was recreated; check the data, then set a new "
            f"baseline with `k2 offsets reset --topic {snapshot.topic}`"
        )
    return CheckOutcome("offset_baseline", passed=not mismatched, severity=AssetCheckSeverity.ERROR, metadata=metadata)


RETENTION_LOSS = "retention_loss"


def retention_loss_evaluation(snapshot: StreamSnapshot) -> CheckOutcome:
    """ERROR while Kafka retention has deleted offsets the table never committed.

    Two sources: a partition whose log start is above the committed offset now (the next
    micro-batch records the loss and carries on from the log start), and losses recorded in
    the table that no operator has accepted yet (`k2 offsets accept-loss`).
    """
    gaps = snapshot.retention_gaps
    recorded = snapshot.unacknowledged_losses
    lost = [
        f"partition {p}: offsets [{committed}, {start}) ({start - committed} messages) are no longer in Kafka; "
        "the next micro-batch records the loss and goes on from the log start"
        for p, (committed, start) in gaps.items()
    ]
    lost += [f"{loss.describe()}; recorded {loss.recorded_at}" for loss in recorded]
    metadata: dict[str, Any] = {
        "topic": snapshot.topic,
        "lost_messages": sum(start - committed for committed, start in gaps.values()) + sum(r.count for r in recorded),
        "lost_ranges": json.dumps(
            [{"partition": p, "start": c, "end": s, "count": s - c, "recorded": False} for p, (c, s) in gaps.items()]
            + [
                {"partition": r.partition, "start": r.start, "end": r.end, "count": r.count, "recorded": True}
                for r in recorded
            ]
        ),
        "acknowledged_losses": sum(1 for loss in snapshot.losses if loss.acknowledged),
    }
    if lost:
        metadata["loss"] = "; ".join(lost)
        metadata["fix"] = (
            f"the data is gone from Kafka: reload it from the source if you can, raise the topic's "
            f"retention.ms, then accept the loss with `k2 offsets accept-loss --topic {snapshot.topic} "
            "--note '<why>'` (recorded in market.trades for audit)"
        )
    return CheckOutcome(RETENTION_LOSS, passed=not lost, severity=AssetCheckSeverity.ERROR, metadata=metadata)


@dataclass
class InFlight:
    """A requested run (micro-batch or recovery) that has not committed its range yet."""

    start: int
    end: int
    run_key: str
    requested_at: float
    attempt: int = 1


@dataclass
class Recovery(InFlight):
    """A requested recovery run of one pending range; ``kind`` is the range's DEFERRED or SPILLED."""

    kind: str = ""


CURSOR_VERSION = 2  # 1: in_flight plus a free "extra" dict; 2: typed fields


@dataclass
class StreamCursor:
    """The sensor's memory between ticks (serialised as JSON in the Dagster cursor).

    ``in_flight`` and ``recovering``: partition -> the micro-batch / recovery run in flight;
    ``degradation``: the DegradationManager's ``to_state()`` (its format is the manager's);
    ``probe_at``: when the circuit breaker's latest half-open probe round was requested;
    ``follower``: the long-running follower run of the topic, while one is requested or running.
    """

    in_flight: dict[int, InFlight] = field(default_factory=dict)
    recovering: dict[int, Recovery] = field(default_factory=dict)
    degradation: dict[str, Any] = field(default_factory=dict)
    probe_at: float | None = None
    follower: InFlight | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": CURSOR_VERSION,
                "in_flight": {str(p): asdict(f) for p, f in self.in_flight.items()},
                "recovering": {str(p): asdict(f) for p, f in self.recovering.items()},
                "degradation": self.degradation,
                "probe_at": self.probe_at,
                "follower": None if self.follower is None else asdict(self.follower),
            }
        )

    @classmethod
    def from_json(cls, raw: str | None) -> StreamCursor:
        """Read a cursor; one of the version-1 format (free ``extra`` dict) is read best effort."""
        if not raw:
            return cls()
        data = json.loads(raw)
        if not isinstance(data, dict):
            return cls()
        if "extra" in data:  # version 1: {"in_flight": ..., "extra": {"degradation", "breaker", "recovery"}}
            extra = data.get("extra") or {}
            breaker = extra.get("breaker") or {}
            data = {
                "in_flight": data.get("in_flight", {}),
                "recovering": extra.get("recovery", {}),
                "degradation": extra.get("degradation", {}),
                "probe_at": breaker.get("probe_at") if isinstance(breaker, dict) else None,
            }
        probe_at = data.get("probe_at")
        return cls(
            in_flight=_flights(data.get("in_flight"), InFlight),
            recovering=_flights(data.get("recovering"), Recovery),
            degradation=dict(data.get("degradation") or {}),
            probe_at=None if probe_at is None else float(probe_at),
            follower=_flights({"0": data["follower"]} if data.get("follower") else None, InFlight).get(0),
        )


_Flight = TypeVar("_Flight", bound=InFlight)


def _flights(raw: Any, kind: type[_Flight]) -> dict[int, _Flight]:
    """partition -> flight from JSON; an entry that does not read is dropped (its range is requested again)."""
    flights: dict[int, _Flight] = {}
    if not isinstance(raw, dict):
        return flights
    names = {f.name for f in fields(kind)}
    for partition, entry in raw.items():
        try:
            flight = kind(**{k: v for k, v in entry.items() if k in names})
            flight.start, flight.end, flight.attempt = int(flight.start), int(flight.end), int(flight.attempt)
            flight.run_key, flight.requested_at = str(flight.run_key), float(flight.requested_at)
            flights[int(partition)] = flight
        except (TypeError, ValueError, AttributeError):
            continue
    return flights


RUN_FAILED = "failed"
RUN_ACTIVE = "active"
RUN_UNKNOWN = "unknown"
RUN_SUCCEEDED = "succeeded"


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
    snapshot: StreamSnapshot,
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
    if snapshot.mismatched:
        return requests  # never request batches for a topic whose offsets went backwards
    for partition in sorted(snapshot.end_offsets):
        committed = snapshot.committed.get(partition, 0)
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
        floor = max(committed, snapshot.start_offsets.get(partition, 0))
        end = min(snapshot.end_offsets[partition], floor + max_batch_messages)
        if end <= committed:
            continue
        batch = OffsetRange(snapshot.topic, partition, committed, end)
        run_key = f"{batch.key}#{attempt}"
        cursor.in_flight[partition] = InFlight(committed, end, run_key, now, attempt)
        requests.append((batch, run_key, attempt))
    return requests


# -- degradation: checks and the rules for batches and recoveries under load ---------------------

DEGRADATION_LEVEL = "degradation_level"
DEFERRED_BACKLOG = "deferred_backlog"
SPILLED_BACKLOG = "spilled_backlog"
SEQUENCE_GAPS = "sequence_gaps"
DEAD_LETTER_COUNT = "dead_letter_count"

# Pending ranges are written back once the level is at most SOFT: at GRACEFUL tier-3 symbols are
# still shed, and spilled batches hold tier-3 rows too, so both kinds wait for the same level.
RECOVERY_MAX_LEVEL = DegradationLevel.SOFT


def degradation_evaluation(manager: DegradationManager) -> CheckOutcome:
    """The level as a check: passes below GRACEFUL, WARN from GRACEFUL, ERROR at CIRCUIT_BREAK."""
    passed, severity = check_status(manager.level)
    last = manager.history[-1] if manager.history else None
    return CheckOutcome(
        DEGRADATION_LEVEL,
        passed=passed,
        severity=AssetCheckSeverity[severity],
        metadata={
            "level": manager.level.name,
            "level_value": int(manager.level),
            "cause": last.cause if last else "no transition yet",
            "last_transition": f"{last.from_level.name} -> {last.to_level.name}" if last else "none",
            "peak_level": manager.peak_level.name,
            "behaviour": describe_level(manager.level),
            "cooldown_remaining_s": round(manager.cooldown_remaining(), 1),
        },
    )


def _backlog_metadata(ranges: list[PendingRange]) -> dict[str, Any]:
    return {
        "ranges": len(ranges),
        "rows": sum(p.rows for p in ranges),
        "offsets": sum(p.end - p.start for p in ranges),
        "oldest": ranges[0].key if ranges else "none",
    }


def deferred_backlog_evaluation(snapshot: StreamSnapshot) -> CheckOutcome:
    """WARN while rows of tier-3 symbols are deferred (recorded in the table, not yet written)."""
    deferred = sorted(snapshot.pending_of(DEFERRED), key=lambda p: (p.start, p.partition))
    metadata = _backlog_metadata(deferred)
    metadata["symbols"] = ", ".join(sorted({s for p in deferred for s in p.symbols})) or "none"
    return CheckOutcome(DEFERRED_BACKLOG, passed=not deferred, severity=AssetCheckSeverity.WARN, metadata=metadata)


def spilled_backlog_evaluation(snapshot: StreamSnapshot, spill_files: dict[str, int]) -> CheckOutcome:
    """WARN while spilled batches wait for recovery; ``spill_files`` is SpillStore.backlog()."""
    spilled = sorted(snapshot.pending_of(SPILLED), key=lambda p: (p.start, p.partition))
    metadata = _backlog_metadata(spilled)
    metadata["spill_files"] = int(spill_files.get("batches", 0))
    metadata["spill_file_rows"] = int(spill_files.get("rows", 0))
    return CheckOutcome(SPILLED_BACKLOG, passed=not spilled, severity=AssetCheckSeverity.WARN, metadata=metadata)


def sequence_gap_evaluation(latest_by_partition: dict[int, dict[str, Any]]) -> CheckOutcome:
    """WARN when the latest micro-batch of any partition found trade ids missing inside its range.

    ``latest_by_partition``: partition -> {"range": str, "gaps": {symbol: missing ids}} from the
    newest materialisation per partition (the runs count the gaps: cheap, no table scan per tick).
    """
    total = sum(sum(entry["gaps"].values()) for entry in latest_by_partition.values())
    return CheckOutcome(
        SEQUENCE_GAPS,
        passed=total == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "missing_trade_ids": total,
            "batches_checked": json.dumps({str(p): e["range"] for p, e in sorted(latest_by_partition.items())}),
            "by_symbol": json.dumps(
                {s: n for e in latest_by_partition.values() for s, n in e["gaps"].items()}, sort_keys=True
            ),
        },
    )


def dead_letter_evaluation(dlq_topic: str, count: int) -> CheckOutcome:
    """WARN when the dead-letter topic holds any message (each carries its reason)."""
    return CheckOutcome(
        DEAD_LETTER_COUNT,
        passed=count == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "dead_letter_topic": dlq_topic,
            "dead_letters": count,
            "how_to_inspect": f"read {dlq_topic} (headers k2.reason and k2.source say why and from where)",
        },
    )


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
    snapshot: StreamSnapshot,
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
    pending = {(p.partition, p.start, p.end): p for p in snapshot.pending}
    requests: list[tuple[PendingRange, str, int]] = []
    for partition, flight in list(flights.items()):
        if (partition, flight.start, flight.end) not in pending:
            del flights[partition]  # recovered
    if level > RECOVERY_MAX_LEVEL or snapshot.mismatched:
        return requests
    for partition in sorted({p.partition for p in snapshot.pending}):
        attempt = 1
        flight = flights.get(partition)
        if flight is not None:
            retry = retry_attempt(flight, run_status, retry_after_s, now)
            if retry is None:
                continue
            attempt = retry
            entry = pending[(partition, flight.start, flight.end)]
        else:
            entry = min((p for p in snapshot.pending if p.partition == partition), key=lambda p: p.start)
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
    snapshot: StreamSnapshot, cursor: StreamCursor, level: DegradationLevel, follow_seconds: float
) -> bool:
    """A follower instead of a run per range: when following is on, the level is NORMAL, there is new
    data, no range or recovery run is in flight (ranges already committed are dropped first), nothing
    is pending (deferred or spilled ranges go through recovery runs) and the topic's offsets are sane."""
    cursor.in_flight = {p: f for p, f in cursor.in_flight.items() if snapshot.committed.get(p, 0) < f.end}
    return (
        follow_seconds > 0
        and level == DegradationLevel.NORMAL
        and snapshot.total_lag > 0
        and not snapshot.pending
        and not snapshot.mismatched
        and not cursor.in_flight
        and not cursor.recovering
    )


# -- one tick as three steps: observe (I/O, in stream_sensor) -> decide -> report ---------------

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
class Observation:
    """Everything one tick reads from outside, so that decide and report need no I/O."""

    snapshot: StreamSnapshot
    run_status: Mapping[str, str] = field(default_factory=dict)  # run key -> RUN_* (the cursor's in-flight keys)
    memory_percent: float = 0.0
    dead_letter_topic: str = ""
    dead_letters: int = 0  # messages ever written to the dead-letter topic
    batch_gaps: Mapping[int, Mapping[str, Any]] = field(default_factory=dict)  # see sequence_gap_evaluation
    spill_files: Mapping[str, int] = field(default_factory=dict)  # SpillStore.backlog()


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
    snapshot = observation.snapshot
    manager = DegradationManager.from_state(cursor.degradation, thresholds=settings.thresholds, clock=lambda: now)
    level = manager.evaluate(snapshot.total_lag, observation.memory_percent)
    cursor.degradation = manager.to_state()

    runs: list[PlannedRun] = []
    probe = False
    run_level = batch_level(level, cursor, manager.changed_at, settings.thresholds.cooldown_seconds, now)
    following = follower_busy(cursor, observation.run_status, settings.retry_after_s, now)
    if run_level is not None and not following and wants_follower(snapshot, cursor, level, settings.follow_seconds):
        run_key = f"follow:{snapshot.topic}@{now:.3f}"
        cursor.follower = InFlight(0, 0, run_key, now)
        runs.append(PlannedRun(OffsetRange(snapshot.topic, 0, 0, 0), run_key, 1, level, FOLLOW))
    elif run_level is not None and not following:
        planned = plan_batches(
            snapshot, cursor, settings.max_batch_messages, observation.run_status, settings.retry_after_s, now
        )
        runs += [PlannedRun(batch, key, attempt, run_level) for batch, key, attempt in planned]
        if planned and level == DegradationLevel.CIRCUIT_BREAK:
            note_probe(cursor, now)
            probe = True
    recoveries = plan_recoveries(snapshot, cursor, level, observation.run_status, settings.retry_after_s, now)
    runs += [PlannedRun(entry.range, key, attempt, level, RECOVER) for entry, key, attempt in recoveries]
    return Decision(cursor, manager, tuple(runs), probe)


@dataclass(frozen=True)
class LogLine:
    level: str  # "info", "warning" or "error": the logger method
    message: str


@dataclass(frozen=True)
class Report:
    """What one tick tells: its check outcomes (in check order) and its log lines."""

    outcomes: tuple[CheckOutcome, ...]
    log_lines: tuple[LogLine, ...] = ()


def report(observation: Observation, decision: Decision, settings: StreamSettings) -> Report:
    """The tick's checks and log lines; pure (``settings`` gives the lag check its thresholds)."""
    lines: list[LogLine] = []
    transition = decision.transition
    if transition is not None:
        lines.append(
            LogLine(
                "warning" if transition.is_escalation else "info",
                f"degradation {transition.from_level.name} -> {transition.to_level.name}: {transition.cause}",
            )
        )
    if decision.probe:
        batches = decision.batches
        lines.append(
            LogLine("info", f"circuit breaker half-open: {len(batches)} probe batch(es) at {batches[0].level.name}")
        )
    snapshot = observation.snapshot
    outcomes = (
        lag_evaluation(snapshot, settings),
        baseline_evaluation(snapshot),
        degradation_evaluation(decision.degradation),
        deferred_backlog_evaluation(snapshot),
        spilled_backlog_evaluation(snapshot, dict(observation.spill_files)),
        sequence_gap_evaluation(dict(observation.batch_gaps)),
        dead_letter_evaluation(observation.dead_letter_topic, observation.dead_letters),
        retention_loss_evaluation(snapshot),
    )
    for partition, (committed, start) in snapshot.retention_gaps.items():
        lines.append(
            LogLine(
                "error",
                f"retention loss on {snapshot.topic}[{partition}]: offsets [{committed}, "
                f"{start}) ({start - committed} messages) were deleted by Kafka before "
                "market.trades committed them",
            )
        )
    return Report(outcomes, tuple(lines))
