"""The stream's asset checks and a tick's report: pure functions of what the tick observed and decided.

Each check is a :class:`CheckOutcome` (passed, severity, metadata naming the fix), ready to
become an AssetCheckEvaluation (the sensor, every tick) or an AssetCheckResult (the asset
checks run on demand, ``k2_assets/binance/checks.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dagster import AssetCheckSeverity

from k2_resources.degradation.levels import DegradationManager, check_status, describe_level
from k2_resources.sink.offsets import DEFERRED, SPILLED, PendingRange
from k2_sensors.binance.stream_observation import Observation, StreamOffsets
from k2_sensors.binance.stream_planning import Decision, StreamSettings


@dataclass(frozen=True)
class CheckOutcome:
    """One asset-check verdict, ready to become an AssetCheckEvaluation or AssetCheckResult."""

    check_name: str
    passed: bool
    severity: AssetCheckSeverity
    metadata: dict[str, Any]


def lag_evaluation(offsets: StreamOffsets, sink: Any) -> CheckOutcome:
    """Consumer lag: passes below the WARN threshold; WARN, then ERROR at the ERROR threshold."""
    lag = offsets.total_lag
    severity = AssetCheckSeverity.ERROR if lag >= sink.lag_error_messages else AssetCheckSeverity.WARN
    return CheckOutcome(
        "consumer_lag",
        passed=lag < sink.lag_warn_messages,
        severity=severity,
        metadata={
            "lag_messages": lag,
            "warn_threshold": sink.lag_warn_messages,
            "error_threshold": sink.lag_error_messages,
            "per_partition": json.dumps({str(p): offsets.lag(p) for p in sorted(offsets.end_offsets)}),
        },
    )


def baseline_evaluation(offsets: StreamOffsets) -> CheckOutcome:
    """ERROR when the topic's offsets are lower than what the table says it committed."""
    mismatched = offsets.mismatched
    metadata: dict[str, Any] = {"topic": offsets.topic}
    if mismatched:
        metadata["mismatch"] = "; ".join(
            f"partition {p}: topic ends at {end} but market.trades committed up to {committed}"
            for p, (end, committed) in mismatched.items()
        )
        metadata["fix"] = (
            f"the topic or the Kafka cluster was recreated; check the data, then set a new "
            f"baseline with `k2 offsets reset --topic {offsets.topic}`"
        )
    return CheckOutcome("offset_baseline", passed=not mismatched, severity=AssetCheckSeverity.ERROR, metadata=metadata)


RETENTION_LOSS = "retention_loss"


def retention_loss_evaluation(offsets: StreamOffsets) -> CheckOutcome:
    """ERROR while Kafka retention has deleted offsets the table never committed.

    Two sources: a partition whose log start is above the committed offset now (the next
    micro-batch records the loss and carries on from the log start), and losses recorded in
    the table that no operator has accepted yet (`k2 offsets accept-loss`).
    """
    gaps = offsets.retention_gaps
    recorded = offsets.unacknowledged_losses
    lost = [
        f"partition {p}: offsets [{committed}, {start}) ({start - committed} messages) are no longer in Kafka; "
        "the next micro-batch records the loss and goes on from the log start"
        for p, (committed, start) in gaps.items()
    ]
    lost += [f"{loss.describe()}; recorded {loss.recorded_at}" for loss in recorded]
    metadata: dict[str, Any] = {
        "topic": offsets.topic,
        "lost_messages": sum(start - committed for committed, start in gaps.values()) + sum(r.count for r in recorded),
        "lost_ranges": json.dumps(
            [{"partition": p, "start": c, "end": s, "count": s - c, "recorded": False} for p, (c, s) in gaps.items()]
            + [
                {"partition": r.partition, "start": r.start, "end": r.end, "count": r.count, "recorded": True}
                for r in recorded
            ]
        ),
        "acknowledged_losses": sum(1 for loss in offsets.losses if loss.acknowledged),
    }
    if lost:
        metadata["loss"] = "; ".join(lost)
        metadata["fix"] = (
            f"the data is gone from Kafka: reload it from the source if you can, raise the topic's "
            f"retention.ms, then accept the loss with `k2 offsets accept-loss --topic {offsets.topic} "
            "--note '<why>'` (recorded in market.trades for audit)"
        )
    return CheckOutcome(RETENTION_LOSS, passed=not lost, severity=AssetCheckSeverity.ERROR, metadata=metadata)


DEGRADATION_LEVEL = "degradation_level"
DEFERRED_BACKLOG = "deferred_backlog"
SPILLED_BACKLOG = "spilled_backlog"
SEQUENCE_GAPS = "sequence_gaps"
DEAD_LETTER_COUNT = "dead_letter_count"


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


def deferred_backlog_evaluation(offsets: StreamOffsets) -> CheckOutcome:
    """WARN while rows of tier-3 symbols are deferred (recorded in the table, not yet written)."""
    deferred = sorted(offsets.pending_of(DEFERRED), key=lambda p: (p.start, p.partition))
    metadata = _backlog_metadata(deferred)
    metadata["symbols"] = ", ".join(sorted({s for p in deferred for s in p.symbols})) or "none"
    return CheckOutcome(DEFERRED_BACKLOG, passed=not deferred, severity=AssetCheckSeverity.WARN, metadata=metadata)


def spilled_backlog_evaluation(offsets: StreamOffsets, spill_files: dict[str, int]) -> CheckOutcome:
    """WARN while spilled batches wait for recovery; ``spill_files`` is SpillStore.backlog()."""
    spilled = sorted(offsets.pending_of(SPILLED), key=lambda p: (p.start, p.partition))
    metadata = _backlog_metadata(spilled)
    metadata["spill_files"] = int(spill_files.get("batches", 0))
    metadata["spill_file_rows"] = int(spill_files.get("rows", 0))
    return CheckOutcome(SPILLED_BACKLOG, passed=not spilled, severity=AssetCheckSeverity.WARN, metadata=metadata)


def sequence_gap_evaluation(
    latest_by_partition: Mapping[int, Mapping[str, Any]], gap_ledger: Mapping[str, Any] | None = None
) -> CheckOutcome:
    """WARN when the latest micro-batch of any partition found trade ids missing inside its range.

    ``latest_by_partition``: partition -> {"range": str, "gaps": {symbol: missing ids}} from the
    newest materialisation per partition (the runs count the gaps: cheap, no table scan per tick).
    ``gap_ledger``: the streamer's gap fill (GapSummary.metadata(), issue 25), merged in: ERROR while
    a gap is unfilled (a loss not yet accepted); batch gaps pass once the gap fill filled them (the
    backfilled trades land in a later batch) or found them absent at the source, and nothing is still filling.
    """
    total = sum(sum(entry["gaps"].values()) for entry in latest_by_partition.values())
    ledger = dict(gap_ledger or {})
    unfilled, filling = ledger.get("gaps_unfilled", 0), ledger.get("gaps_filling", 0)
    closed = ledger.get("gaps_filled", 0) + ledger.get("gaps_absent_at_source", 0)  # absent: never traded
    explained = total > 0 and closed > 0 and not filling
    return CheckOutcome(
        SEQUENCE_GAPS,
        passed=not unfilled and (total == 0 or explained),
        severity=AssetCheckSeverity.ERROR if unfilled else AssetCheckSeverity.WARN,
        metadata={
            **ledger,
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
    offsets = observation.offsets
    outcomes = (
        lag_evaluation(offsets, settings),
        baseline_evaluation(offsets),
        degradation_evaluation(decision.degradation),
        deferred_backlog_evaluation(offsets),
        spilled_backlog_evaluation(offsets, dict(observation.spill_files)),
        sequence_gap_evaluation(dict(observation.batch_gaps), observation.gap_ledger),
        dead_letter_evaluation(observation.dead_letter_topic, observation.dead_letters),
        retention_loss_evaluation(offsets),
    )
    for partition, (committed, start) in offsets.retention_gaps.items():
        lines.append(
            LogLine(
                "error",
                f"retention loss on {offsets.topic}[{partition}]: offsets [{committed}, "
                f"{start}) ({start - committed} messages) were deleted by Kafka before "
                "market.trades committed them",
            )
        )
    return Report(outcomes, tuple(lines))
