"""The stream sensor's rules: which ranges it requests, retries, its cursor, and how checks judge lag."""

from __future__ import annotations

import json

from dagster import AssetCheckSeverity

from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.offsets import DEFERRED
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_checks import baseline_evaluation, lag_evaluation
from k2_sensors.binance.stream_cursor import RUN_ACTIVE, RUN_FAILED, RUN_SUCCEEDED, InFlight, Recovery, StreamCursor
from k2_sensors.binance.stream_observation import StreamOffsets
from k2_sensors.binance.stream_planning import plan_batches, recovery_run_keys, retry_attempt

TOPIC = BINANCE_TRADES_TOPIC


def snap(ends: dict[int, int], committed: dict[int, int]) -> StreamOffsets:
    return StreamOffsets(TOPIC, ends, committed)


def test_requests_one_bounded_range_per_partition_from_the_committed_offset():
    cursor = StreamCursor()
    planned = plan_batches(snap({0: 250, 1: 40, 2: 0}, {0: 100}), cursor, 100, {}, 300, now=0)
    assert [(b.partition, b.start, b.end, key) for b, key, _ in planned] == [
        (0, 100, 200, f"{TOPIC}-0-100-200#1"),
        (1, 0, 40, f"{TOPIC}-1-0-40#1"),
    ]
    assert set(cursor.in_flight) == {0, 1}


def test_never_two_runs_on_one_partition_while_the_first_is_active_or_pending():
    cursor = StreamCursor()
    plan_batches(snap({0: 250}, {0: 0}), cursor, 100, {}, 300, now=0)
    key = cursor.in_flight[0].run_key
    assert plan_batches(snap({0: 400}, {0: 0}), cursor, 100, {key: RUN_ACTIVE}, 300, now=10) == []
    assert plan_batches(snap({0: 400}, {0: 0}), cursor, 100, {}, 300, now=20) == []  # launched, not visible yet


def test_next_range_follows_once_the_table_has_committed_the_previous_one():
    cursor = StreamCursor()
    plan_batches(snap({0: 250}, {0: 0}), cursor, 100, {}, 300, now=0)
    planned = plan_batches(snap({0: 250}, {0: 100}), cursor, 100, {}, 300, now=5)
    assert [(b.start, b.end, attempt) for b, _, attempt in planned] == [(100, 200, 1)]


def test_failed_or_vanished_run_is_requested_again_with_a_new_run_key():
    cursor = StreamCursor()
    plan_batches(snap({0: 50}, {}), cursor, 100, {}, 300, now=0)
    first = cursor.in_flight[0].run_key
    again = plan_batches(snap({0: 50}, {}), cursor, 100, {first: RUN_FAILED}, 300, now=1)
    assert [(b.start, b.end, attempt) for b, _, attempt in again] == [(0, 50, 2)]
    second = cursor.in_flight[0].run_key
    assert second != first
    # no run ever appeared for the second request: retried after the retry period only
    assert plan_batches(snap({0: 50}, {}), cursor, 100, {}, 300, now=200) == []
    third = plan_batches(snap({0: 50}, {}), cursor, 100, {}, 300, now=302)
    assert [attempt for _, _, attempt in third] == [3]


def test_run_that_succeeded_without_committing_is_retried():
    cursor = StreamCursor()
    plan_batches(snap({0: 50}, {}), cursor, 100, {}, 300, now=0)
    key = cursor.in_flight[0].run_key
    assert len(plan_batches(snap({0: 50}, {}), cursor, 100, {key: RUN_SUCCEEDED}, 300, now=1)) == 1


def test_cursor_round_trips_through_json():
    cursor = StreamCursor(degradation={"version": 1, "level": "SOFT"}, probe_at=130.0)
    plan_batches(snap({0: 50, 3: 9}, {}), cursor, 100, {}, 300, now=7)
    cursor.recovering[1] = Recovery(0, 40, f"recover:{TOPIC}-1-0-40#2", 5.0, 2, DEFERRED)
    restored = StreamCursor.from_json(cursor.to_json())
    assert restored == cursor
    assert StreamCursor.from_json(None) == StreamCursor.from_json("") == StreamCursor()


def test_a_cursor_of_the_old_format_with_extra_is_read():
    old = json.dumps(
        {
            "in_flight": {
                "0": {"start": 0, "end": 50, "run_key": f"{TOPIC}-0-0-50#1", "requested_at": 7.0, "attempt": 1},
                "1": {"start": 0},
                "2": {"start": "bad", "end": 9, "run_key": "x", "requested_at": 0},
            },  # unreadable: dropped
            "extra": {
                "degradation": {
                    "version": 1,
                    "level": "SOFT",
                    "changed_at": 100.0,
                    "peak_level": "GRACEFUL",
                    "history": [],
                },
                "breaker": {"probe_at": 130.0},
                "recovery": {
                    "1": {
                        "start": 0,
                        "end": 40,
                        "kind": DEFERRED,
                        "run_key": f"recover:{TOPIC}-1-0-40#2",
                        "requested_at": 5.0,
                        "attempt": 2,
                    }
                },
            },
        }
    )
    cursor = StreamCursor.from_json(old)
    assert cursor.in_flight == {0: InFlight(0, 50, f"{TOPIC}-0-0-50#1", 7.0, 1)}
    assert cursor.recovering == {1: Recovery(0, 40, f"recover:{TOPIC}-1-0-40#2", 5.0, 2, DEFERRED)}
    assert cursor.degradation["level"] == "SOFT" and cursor.probe_at == 130.0
    assert recovery_run_keys(cursor) == [f"recover:{TOPIC}-1-0-40#2"]
    assert StreamCursor.from_json(json.dumps({"in_flight": {}, "extra": {}})) == StreamCursor()
    assert StreamCursor.from_json("[]") == StreamCursor()


def test_one_retry_rule_for_batches_and_recoveries():
    flight = InFlight(0, 50, "k#3", requested_at=100.0, attempt=3)
    assert retry_attempt(flight, {"k#3": RUN_ACTIVE}, 300, now=1000.0) is None  # active: never retried
    assert retry_attempt(flight, {}, 300, now=400.0) is None  # not visible yet, within the retry period
    assert retry_attempt(flight, {}, 300, now=400.5) == 4  # vanished
    assert retry_attempt(flight, {"k#3": RUN_FAILED}, 300, now=101.0) == 4
    assert retry_attempt(flight, {"k#3": RUN_SUCCEEDED}, 300, now=101.0) == 4  # finished without committing
    recovery = Recovery(0, 50, "recover:k#1", 100.0, 1, DEFERRED)
    assert retry_attempt(recovery, {"recover:k#1": RUN_FAILED}, 300, now=101.0) == 2


def test_offsets_below_the_tables_stop_all_requests_and_fail_the_baseline_check():
    snapshot = snap({0: 10, 1: 500}, {0: 900, 1: 400})
    assert plan_batches(snapshot, StreamCursor(), 100, {}, 300, now=0) == []
    outcome = baseline_evaluation(snapshot)
    assert outcome.passed is False and outcome.severity == AssetCheckSeverity.ERROR
    assert "partition 0: topic ends at 10 but market.trades committed up to 900" in outcome.metadata["mismatch"]
    assert "k2 offsets reset" in outcome.metadata["fix"]
    assert baseline_evaluation(snap({0: 900}, {0: 900})).passed is True


def test_lag_check_passes_then_warns_then_errors():
    sink = TradeSinkResource(lag_warn_messages=100, lag_error_messages=1000)
    ok = lag_evaluation(snap({0: 50, 1: 49}, {}), sink)
    warn = lag_evaluation(snap({0: 600}, {0: 100}), sink)
    error = lag_evaluation(snap({0: 1500, 1: 0}, {0: 400}), sink)
    assert (ok.passed, ok.metadata["lag_messages"]) == (True, 99)
    assert (warn.passed, warn.severity, warn.metadata["lag_messages"]) == (False, AssetCheckSeverity.WARN, 500)
    assert (error.passed, error.severity) == (False, AssetCheckSeverity.ERROR)
