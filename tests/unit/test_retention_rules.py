"""Retention loss in the stream sensor's rules: told apart from a recreated topic, loud until accepted."""

from __future__ import annotations

import json

from dagster import AssetCheckSeverity

from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.offsets import RetentionLoss
from k2_sensors.binance.stream_checks import LogLine, baseline_evaluation, report, retention_loss_evaluation
from k2_sensors.binance.stream_cursor import StreamCursor
from k2_sensors.binance.stream_observation import Observation, StreamOffsets
from k2_sensors.binance.stream_planning import StreamSettings, decide, plan_batches

TOPIC = BINANCE_TRADES_TOPIC
SETTINGS = StreamSettings(
    topic=TOPIC, max_batch_messages=100, retry_after_s=300, lag_warn_messages=50_000, lag_error_messages=500_000
)


def snapshot(
    starts: dict[int, int], ends: dict[int, int], committed: dict[int, int], losses: tuple[RetentionLoss, ...] = ()
) -> StreamOffsets:
    return StreamOffsets(TOPIC, ends, committed, (), starts, losses)


def test_a_log_start_past_the_committed_offset_is_an_error_naming_partition_range_and_count():
    seen = snapshot(starts={0: 300, 1: 0}, ends={0: 400, 1: 50}, committed={0: 200, 1: 50})
    outcome = retention_loss_evaluation(seen)
    assert (outcome.check_name, outcome.passed, outcome.severity) == ("retention_loss", False, AssetCheckSeverity.ERROR)
    assert outcome.metadata["lost_messages"] == 100
    assert json.loads(outcome.metadata["lost_ranges"]) == [
        {"partition": 0, "start": 200, "end": 300, "count": 100, "recorded": False}
    ]
    assert "partition 0: offsets [200, 300) (100 messages)" in outcome.metadata["loss"]
    assert f"k2 offsets accept-loss --topic {TOPIC}" in outcome.metadata["fix"]
    # The same topic, not a recreated one: the baseline check passes.
    assert baseline_evaluation(seen).passed


def test_the_batch_after_a_retention_gap_starts_at_the_committed_offset_and_reads_a_full_batch_from_the_log_start():
    seen = snapshot(starts={0: 300, 1: 0}, ends={0: 1000, 1: 50}, committed={0: 200, 1: 0})
    planned = plan_batches(seen, StreamCursor(), 100, {}, 300, now=0.0)
    assert [(b.partition, b.start, b.end) for b, _, _ in planned] == [(0, 200, 400), (1, 0, 50)]


def test_a_partition_wholly_deleted_still_gets_a_batch_that_records_the_loss():
    seen = snapshot(starts={0: 500}, ends={0: 500}, committed={0: 200})
    planned = plan_batches(seen, StreamCursor(), 100, {}, 300, now=0.0)
    assert [(b.start, b.end) for b, _, _ in planned] == [(200, 500)]


def test_a_recreated_topic_is_a_baseline_mismatch_not_a_retention_loss_and_stops_batches():
    # The new topic ends below the committed offset: recreated, whatever its log start says.
    seen = snapshot(starts={0: 40}, ends={0: 60}, committed={0: 200})
    assert seen.retention_gaps == {}
    assert retention_loss_evaluation(seen).passed
    assert not baseline_evaluation(seen).passed
    assert plan_batches(seen, StreamCursor(), 100, {}, 300, now=0.0) == []


def test_a_recorded_loss_keeps_the_check_red_until_it_is_acknowledged():
    loss = RetentionLoss(TOPIC, 2, 10, 35, "2026-11-30T03:00:00+00:00")
    red = retention_loss_evaluation(snapshot(starts={2: 40}, ends={2: 90}, committed={2: 90}, losses=(loss,)))
    assert not red.passed and red.metadata["lost_messages"] == 25
    assert json.loads(red.metadata["lost_ranges"]) == [
        {"partition": 2, "start": 10, "end": 35, "count": 25, "recorded": True}
    ]
    accepted = RetentionLoss(TOPIC, 2, 10, 35, loss.recorded_at, "2026-11-30T04:00:00+00:00", "ops", "reloaded")
    green = retention_loss_evaluation(snapshot(starts={2: 40}, ends={2: 90}, committed={2: 90}, losses=(accepted,)))
    assert green.passed and green.metadata["lost_messages"] == 0 and green.metadata["acknowledged_losses"] == 1


def test_a_tick_logs_the_loss_as_an_error_and_reports_the_check():
    observation = Observation(
        snapshot(starts={0: 300}, ends={0: 400}, committed={0: 200}), dead_letter_topic=f"{TOPIC}.dlq"
    )
    decision = decide(observation, StreamCursor(), SETTINGS, now=0.0)
    assert [(r.range.start, r.range.end) for r in decision.runs] == [(200, 400)]
    told = report(observation, decision, SETTINGS)
    assert (
        LogLine(
            "error",
            f"retention loss on {TOPIC}[0]: offsets [200, 300) (100 messages) were deleted by "
            "Kafka before market.trades committed them",
        )
        in told.log_lines
    )
    assert not {o.check_name: o for o in told.outcomes}["retention_loss"].passed


def test_loss_history_round_trips_through_its_json_form():
    loss = RetentionLoss(TOPIC, 1, 5, 9, "t0", "t1", "ops", "why")
    assert RetentionLoss.from_dict(TOPIC, json.loads(json.dumps(loss.to_dict()))) == loss
    assert loss.count == 4 and loss.acknowledged
