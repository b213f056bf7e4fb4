"""The stream sensor's decisions, as pure functions of offsets and its cursor.

Kept apart from the Dagster sensor so every rule (which ranges to request, when a range is
in flight, when lag or a baseline mismatch fails a check) is unit-testable without Kafka.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from dagster import AssetCheckSeverity

from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.trades.offsets import DEFERRED, SPILLED, OffsetRange, PendingRange, committed_offsets, pending_ranges
from k2_sensors.operations.degradation import DegradationLevel, DegradationManager, check_status, describe_level


@dataclass(frozen=True)
class StreamSnapshot:
    """Where the topic ends, where the table's committed offsets are (per partition), and which
    ranges below them are pending (deferred or spilled by load shedding)."""

    topic: str
    end_offsets: dict[int, int]
    committed: dict[int, int]
    pending: tuple[PendingRange, ...] = ()

    @classmethod
    def read(cls, kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> "StreamSnapshot":
        ends = kafka.end_offsets(topic)
        table = iceberg.trades()
        return cls(topic, ends, committed_offsets(table, topic), tuple(pending_ranges(table, topic)))

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
        found = {p: (self.end_offsets.get(p, 0), c) for p, c in self.committed.items() if self.end_offsets.get(p, 0) < c}
        return dict(sorted(found.items()))


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
        metadata["fix"] = (f"the topic or the Kafka cluster was recreated; check the data, then set a new "
                           f"baseline with `k2 offsets reset --topic {snapshot.topic}`")
    return CheckOutcome("offset_baseline", passed=not mismatched, severity=AssetCheckSeverity.ERROR, metadata=metadata)


@dataclass
class InFlight:
    """A requested micro-batch run that has not committed yet."""

    start: int
    end: int
    run_key: str
    requested_at: float
    attempt: int = 1


@dataclass
class StreamCursor:
    """The sensor's memory between ticks (serialised as JSON in the Dagster cursor)."""

    in_flight: dict[int, InFlight] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # state other components keep here

    def to_json(self) -> str:
        return json.dumps({"in_flight": {str(p): asdict(f) for p, f in self.in_flight.items()}, "extra": self.extra})

    @classmethod
    def from_json(cls, raw: str | None) -> "StreamCursor":
        if not raw:
            return cls()
        data = json.loads(raw)
        return cls(
            in_flight={int(p): InFlight(**f) for p, f in data.get("in_flight", {}).items()},
            extra=data.get("extra", {}),
        )


RUN_FAILED = "failed"
RUN_ACTIVE = "active"
RUN_UNKNOWN = "unknown"
RUN_SUCCEEDED = "succeeded"


def plan_batches(
    snapshot: StreamSnapshot,
    cursor: StreamCursor,
    max_batch_messages: int,
    run_status: dict[str, str],
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
            status = run_status.get(flight.run_key, RUN_UNKNOWN)
            waiting = status == RUN_UNKNOWN and now - flight.requested_at <= retry_after_s
            if status == RUN_ACTIVE or waiting:
                cursor.in_flight[partition] = flight
                continue
            # Failed, vanished, or finished without committing: request again from where the table is.
            attempt = flight.attempt + 1
        end = min(snapshot.end_offsets[partition], committed + max_batch_messages)
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
            "by_symbol": json.dumps({s: n for e in latest_by_partition.values() for s, n in e["gaps"].items()},
                                    sort_keys=True),
        },
    )


def dead_letter_evaluation(dlq_topic: str, count: int) -> CheckOutcome:
    """WARN when the dead-letter topic holds any message (each carries its reason)."""
    return CheckOutcome(
        DEAD_LETTER_COUNT,
        passed=count == 0,
        severity=AssetCheckSeverity.WARN,
        metadata={"dead_letter_topic": dlq_topic, "dead_letters": count,
                  "how_to_inspect": f"read {dlq_topic} (headers k2.reason and k2.source say why and from where)"},
    )


def batch_level(level: DegradationLevel, cursor: StreamCursor, changed_at: float | None,
                cooldown_s: float, now: float) -> DegradationLevel | None:
    """The level new batches run at, or None when none may be requested now.

    At CIRCUIT_BREAK no batch is requested, except one probe round per cooldown (the breaker
    half-opens), run at AGGRESSIVE: spilling is the cheapest way to move the committed offsets,
    and without it a break caused by lag could never end (lag only falls when batches run).
    """
    if level < DegradationLevel.CIRCUIT_BREAK:
        return level
    breaker = cursor.extra.setdefault("breaker", {})
    last = max(changed_at or 0.0, float(breaker.get("probe_at", 0.0)))
    if now - last < cooldown_s:
        return None
    return DegradationLevel.AGGRESSIVE


def note_probe(cursor: StreamCursor, now: float) -> None:
    """Remember that a half-open probe round was requested at ``now``."""
    cursor.extra.setdefault("breaker", {})["probe_at"] = now


def plan_recoveries(
    snapshot: StreamSnapshot,
    cursor: StreamCursor,
    level: DegradationLevel,
    run_status: dict[str, str],
    retry_after_s: float,
    now: float | None = None,
) -> list[tuple[PendingRange, str, int]]:
    """Recovery runs to request now, oldest pending range first, one in flight per partition.

    Only at RECOVERY_MAX_LEVEL or below. A recovery is done once its range is no longer pending;
    a failed run (or one that never appeared) is requested again with a new run key. State lives
    in ``cursor.extra["recovery"]`` (partition -> the range in flight).
    """
    now = time.time() if now is None else now
    flights: dict[str, dict[str, Any]] = cursor.extra.setdefault("recovery", {})
    pending = {(p.partition, p.start, p.end): p for p in snapshot.pending}
    requests: list[tuple[PendingRange, str, int]] = []
    for partition_key in list(flights):
        flight = flights[partition_key]
        if (int(partition_key), flight["start"], flight["end"]) not in pending:
            del flights[partition_key]  # recovered
    if level > RECOVERY_MAX_LEVEL or snapshot.mismatched:
        return requests
    for partition in sorted({p.partition for p in snapshot.pending}):
        attempt = 1
        flight = flights.get(str(partition))
        if flight is not None:
            status = run_status.get(flight["run_key"], RUN_UNKNOWN)
            waiting = status == RUN_UNKNOWN and now - flight["requested_at"] <= retry_after_s
            if status == RUN_ACTIVE or waiting:
                continue
            attempt = int(flight["attempt"]) + 1
            entry = pending[(partition, flight["start"], flight["end"])]
        else:
            entry = min((p for p in snapshot.pending if p.partition == partition), key=lambda p: p.start)
        run_key = f"recover:{entry.range.key}#{attempt}"
        flights[str(partition)] = {"start": entry.start, "end": entry.end, "kind": entry.kind,
                                   "run_key": run_key, "requested_at": now, "attempt": attempt}
        requests.append((entry, run_key, attempt))
    return requests


def recovery_run_keys(cursor: StreamCursor) -> list[str]:
    return [flight["run_key"] for flight in cursor.extra.get("recovery", {}).values()]
