"""The stream sensor's degradation rules: probes at CIRCUIT_BREAK, recovery planning, backlog checks."""

from __future__ import annotations

import itertools

from dagster import AssetCheckSeverity

from k2_resources.degradation.levels import DegradationLevel, DegradationManager, DegradationThresholds
from k2_resources.degradation.shedding import LoadShedder
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC, dead_letter_topic
from k2_resources.sink.enrich import enrich
from k2_resources.sink.gaps_and_shedding import sequence_gaps
from k2_resources.sink.offsets import DEFERRED, SPILLED, PendingRange
from k2_sensors.binance.stream_checks import (
    dead_letter_evaluation,
    deferred_backlog_evaluation,
    degradation_evaluation,
    spilled_backlog_evaluation,
)
from k2_sensors.binance.stream_cursor import RUN_ACTIVE, RUN_FAILED, StreamCursor
from k2_sensors.binance.stream_observation import StreamOffsets
from k2_sensors.binance.stream_planning import batch_level, note_probe, plan_recoveries

TOPIC = BINANCE_TRADES_TOPIC


def deferred(partition: int, start: int, end: int) -> PendingRange:
    return PendingRange(TOPIC, partition, start, end, DEFERRED, ("PEPEUSDT",), 5)


def spilled(partition: int, start: int, end: int) -> PendingRange:
    return PendingRange(TOPIC, partition, start, end, SPILLED, (), end - start)


def snap(pending: list[PendingRange]) -> StreamOffsets:
    return StreamOffsets(TOPIC, {0: 1000, 1: 1000}, {0: 1000, 1: 1000}, tuple(pending))


def test_pending_range_round_trips_and_says_which_rows_are_missing():
    entry = deferred(0, 10, 20)
    assert PendingRange.from_dict(TOPIC, entry.to_dict()) == entry
    assert entry.is_missing("PEPEUSDT") and not entry.is_missing("BTCUSDT")
    assert spilled(0, 10, 20).is_missing("BTCUSDT")


def test_below_circuit_break_batches_run_at_the_level():
    cursor = StreamCursor()
    for level in list(DegradationLevel)[:4]:
        assert batch_level(level, cursor, changed_at=100.0, cooldown_s=30, now=101.0) == level


def test_circuit_break_requests_nothing_until_a_cooldown_then_one_probe_round_at_aggressive():
    cursor = StreamCursor()
    cb = DegradationLevel.CIRCUIT_BREAK
    assert batch_level(cb, cursor, changed_at=100.0, cooldown_s=30, now=129.0) is None
    assert batch_level(cb, cursor, changed_at=100.0, cooldown_s=30, now=130.0) == DegradationLevel.AGGRESSIVE
    note_probe(cursor, 130.0)
    assert batch_level(cb, cursor, changed_at=100.0, cooldown_s=30, now=150.0) is None
    assert batch_level(cb, cursor, changed_at=100.0, cooldown_s=30, now=160.0) == DegradationLevel.AGGRESSIVE


def test_recoveries_wait_for_soft_then_go_oldest_first_one_per_partition():
    cursor = StreamCursor()
    pending = [deferred(0, 200, 300), spilled(0, 100, 200), deferred(1, 0, 50)]
    assert plan_recoveries(snap(pending), cursor, DegradationLevel.GRACEFUL, {}, 300, now=0) == []
    planned = plan_recoveries(snap(pending), cursor, DegradationLevel.SOFT, {}, 300, now=0)
    assert [(e.partition, e.start, e.kind, key) for e, key, _ in planned] == [
        (0, 100, SPILLED, f"recover:{TOPIC}-0-100-200#1"),
        (1, 0, DEFERRED, f"recover:{TOPIC}-1-0-50#1"),
    ]
    # In flight: nothing new for those partitions.
    key0 = planned[0][1]
    assert plan_recoveries(snap(pending), cursor, DegradationLevel.NORMAL, {key0: RUN_ACTIVE}, 300, now=5) == []
    # Partition 0's range recovered: the next one follows.
    after = [deferred(0, 200, 300), deferred(1, 0, 50)]
    planned = plan_recoveries(snap(after), cursor, DegradationLevel.NORMAL, {}, 300, now=6)
    assert [(e.partition, e.start) for e, _, _ in planned] == [(0, 200)]


def test_a_failed_recovery_is_requested_again_with_a_new_run_key():
    cursor = StreamCursor()
    pending = [deferred(0, 0, 100)]
    ((_, key, _),) = plan_recoveries(snap(pending), cursor, DegradationLevel.NORMAL, {}, 300, now=0)
    ((entry, again, attempt),) = plan_recoveries(
        snap(pending), cursor, DegradationLevel.NORMAL, {key: RUN_FAILED}, 300, now=1
    )
    assert (entry.start, attempt) == (0, 2) and again.endswith("#2")


def test_no_recovery_for_a_topic_whose_offsets_went_backwards():
    cursor = StreamCursor()
    snapshot = StreamOffsets(TOPIC, {0: 10}, {0: 1000}, (deferred(0, 0, 100),))
    assert plan_recoveries(snapshot, cursor, DegradationLevel.NORMAL, {}, 300, now=0) == []


def test_level_check_warns_from_graceful_errors_at_circuit_break_and_names_the_cause():
    clock = itertools.count(0, 100).__next__
    manager = DegradationManager(DegradationThresholds(lag_messages=(10, 20, 30, 40), cooldown_seconds=0), clock=clock)
    manager.evaluate(25, 1.0)
    outcome = degradation_evaluation(manager)
    assert (outcome.passed, outcome.severity) == (False, AssetCheckSeverity.WARN)
    assert outcome.metadata["level"] == "GRACEFUL" and "lag 25" in outcome.metadata["cause"]
    manager.evaluate(45, 1.0)
    assert (degradation_evaluation(manager).passed, degradation_evaluation(manager).severity) == (
        False,
        AssetCheckSeverity.ERROR,
    )
    for _ in range(4):
        manager.evaluate(0, 1.0)
    assert degradation_evaluation(manager).passed and manager.level == DegradationLevel.NORMAL


def test_backlog_and_dead_letter_checks():
    snapshot = snap([deferred(0, 0, 100), spilled(1, 0, 40)])
    deferred_check = deferred_backlog_evaluation(snapshot)
    assert not deferred_check.passed and deferred_check.metadata["symbols"] == "PEPEUSDT"
    spilled_check = spilled_backlog_evaluation(snapshot, {"batches": 1, "rows": 40})
    assert not spilled_check.passed and spilled_check.metadata["rows"] == 40
    assert deferred_backlog_evaluation(snap([])).passed and spilled_backlog_evaluation(snap([]), {}).passed
    assert (
        dead_letter_evaluation(dead_letter_topic("t"), 0).passed
        and not dead_letter_evaluation(dead_letter_topic("t"), 3).passed
    )


def test_sequence_gaps_count_missing_ids_per_symbol():
    records = [{"symbol": "A", "source_sequence": s} for s in (1, 2, 5, 6, 9)] + [
        {"symbol": "B", "source_sequence": s} for s in (7, 8)
    ]
    assert sequence_gaps(records) == {"A": 4}


def test_enrichment_adds_exact_notional_and_tier():
    from decimal import Decimal

    records = [
        {
            "symbol": "BTCUSDT",
            "price": Decimal("61686.00000000"),
            "quantity": Decimal("0.00705000"),
            "vendor_data": {"E": "1"},
        }
    ]
    enrich(records, LoadShedder())
    assert records[0]["vendor_data"] == {"E": "1", "k2.notional": "434.8863", "k2.tier": "1"}
