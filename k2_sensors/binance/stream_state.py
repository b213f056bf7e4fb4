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
from k2_resources.trades.offsets import OffsetRange, committed_offsets


@dataclass(frozen=True)
class StreamSnapshot:
    """Where the topic ends and where the table's committed offsets are, per partition."""

    topic: str
    end_offsets: dict[int, int]
    committed: dict[int, int]

    @classmethod
    def read(cls, kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> "StreamSnapshot":
        return cls(topic, kafka.end_offsets(topic), committed_offsets(iceberg.trades(), topic))

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
