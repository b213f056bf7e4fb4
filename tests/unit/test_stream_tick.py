"""One stream-sensor tick without Kafka: decide and report from a hand-made Observation."""

from __future__ import annotations

import copy

from dagster import AssetCheckSeverity

from k2_resources.degradation.levels import DegradationLevel, DegradationThresholds
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.offsets import DEFERRED, PendingRange
from k2_sensors.binance.stream_checks import LogLine, report
from k2_sensors.binance.stream_cursor import RUN_ACTIVE, RUN_FAILED, StreamCursor
from k2_sensors.binance.stream_observation import Observation, StreamOffsets
from k2_sensors.binance.stream_planning import INGEST, RECOVER, StreamSettings, decide

TOPIC = BINANCE_TRADES_TOPIC
SETTINGS = StreamSettings(
    topic=TOPIC,
    max_batch_messages=100,
    retry_after_s=300,
    lag_warn_messages=50,
    lag_error_messages=1000,
    thresholds=DegradationThresholds(lag_messages=(1000, 2000, 3000, 4000), cooldown_seconds=30),
)
CHECKS = [
    "consumer_lag",
    "offset_baseline",
    "degradation_level",
    "deferred_backlog",
    "spilled_backlog",
    "sequence_gaps",
    "dead_letter_count",
    "retention_loss",
]


def observed(
    ends: dict[int, int], committed: dict[int, int], pending: tuple[PendingRange, ...] = (), **more
) -> Observation:
    return Observation(StreamOffsets(TOPIC, ends, committed, pending), dead_letter_topic=f"{TOPIC}.dlq", **more)


def test_decide_plans_batches_at_the_level_and_leaves_the_given_cursor_alone():
    cursor = StreamCursor()
    before = copy.deepcopy(cursor)
    decision = decide(observed({0: 250, 1: 40}, {0: 100}), cursor, SETTINGS, now=10.0)
    assert cursor == before
    assert [
        (r.range.partition, r.range.start, r.range.end, r.run_key, r.attempt, r.level, r.mode) for r in decision.runs
    ] == [
        (0, 100, 200, f"{TOPIC}-0-100-200#1", 1, DegradationLevel.NORMAL, INGEST),
        (1, 0, 40, f"{TOPIC}-1-0-40#1", 1, DegradationLevel.NORMAL, INGEST),
    ]
    assert set(decision.cursor.in_flight) == {0, 1} and decision.cursor.degradation["level"] == "NORMAL"
    assert decision.transition is None and not decision.probe


def test_decide_retries_from_the_observed_run_status():
    first = decide(observed({0: 50}, {}), StreamCursor(), SETTINGS, now=0.0)
    key = first.runs[0].run_key
    assert decide(observed({0: 50}, {}, run_status={key: RUN_ACTIVE}), first.cursor, SETTINGS, now=1.0).runs == ()
    again = decide(observed({0: 50}, {}, run_status={key: RUN_FAILED}), first.cursor, SETTINGS, now=1.0)
    assert [(r.run_key, r.attempt) for r in again.runs] == [(f"{TOPIC}-0-0-50#2", 2)]


def test_circuit_break_waits_a_cooldown_then_probes_at_aggressive_and_says_so():
    lag = {0: 5000}
    broken = decide(observed(lag, {}), StreamCursor(), SETTINGS, now=100.0)
    assert broken.level == DegradationLevel.CIRCUIT_BREAK and broken.runs == ()
    told = report(observed(lag, {}), broken, SETTINGS)
    assert told.log_lines == (LogLine("warning", f"degradation NORMAL -> CIRCUIT_BREAK: {broken.transition.cause}"),)

    probe = decide(observed(lag, {}), broken.cursor, SETTINGS, now=130.0)
    assert probe.probe and probe.cursor.probe_at == 130.0 and probe.transition is None
    assert [(r.level, r.mode) for r in probe.runs] == [(DegradationLevel.AGGRESSIVE, INGEST)]
    assert report(observed(lag, {}), probe, SETTINGS).log_lines == (
        LogLine("info", "circuit breaker half-open: 1 probe batch(es) at AGGRESSIVE"),
    )
    assert decide(observed(lag, {}), probe.cursor, SETTINGS, now=150.0).runs == ()  # one round per cooldown


def test_decide_requests_recoveries_at_the_level_once_the_level_allows():
    pending = (PendingRange(TOPIC, 0, 0, 40, DEFERRED, ("PEPEUSDT",), 5),)
    decision = decide(observed({0: 100}, {0: 100}, pending), StreamCursor(), SETTINGS, now=0.0)
    assert [(r.run_key, r.level, r.mode) for r in decision.runs] == [
        (f"recover:{TOPIC}-0-0-40#1", DegradationLevel.NORMAL, RECOVER)
    ]
    assert decision.recoveries == decision.runs and decision.batches == ()
    assert set(decision.cursor.recovering) == {0}


def test_report_gives_every_check_in_order_from_the_observation():
    observation = observed(
        {0: 600},
        {0: 100},
        memory_percent=12.5,
        dead_letters=3,
        batch_gaps={0: {"range": "0-100", "gaps": {"BTCUSDT": 2}}},
        spill_files={"batches": 1, "rows": 7},
    )
    told = report(observation, decide(observation, StreamCursor(), SETTINGS, now=0.0), SETTINGS)
    outcomes = {o.check_name: o for o in told.outcomes}
    assert [o.check_name for o in told.outcomes] == CHECKS
    assert (outcomes["consumer_lag"].passed, outcomes["consumer_lag"].severity) == (False, AssetCheckSeverity.WARN)
    assert outcomes["consumer_lag"].metadata["lag_messages"] == 500
    assert outcomes["offset_baseline"].passed and outcomes["degradation_level"].passed
    assert outcomes["spilled_backlog"].metadata["spill_files"] == 1
    assert outcomes["sequence_gaps"].metadata["missing_trade_ids"] == 2
    assert outcomes["dead_letter_count"].metadata == {
        "dead_letter_topic": f"{TOPIC}.dlq",
        "dead_letters": 3,
        "how_to_inspect": f"read {TOPIC}.dlq (headers k2.reason and k2.source say why and from where)",
    }
    assert told.log_lines == ()


def test_a_tick_carries_on_from_a_cursor_of_the_old_format():
    old = (
        '{"in_flight": {"0": {"start": 0, "end": 50, "run_key": "k#1", "requested_at": 100.0, "attempt": 1}}, '
        '"extra": {"degradation": {"version": 1, "level": "SOFT", "changed_at": 100.0, "peak_level": "SOFT", '
        '"history": []}, "breaker": {"probe_at": 90.0}, "recovery": {}}}'
    )
    decision = decide(
        observed({0: 50}, {}, run_status={"k#1": RUN_ACTIVE}), StreamCursor.from_json(old), SETTINGS, now=110.0
    )
    assert decision.level == DegradationLevel.SOFT and decision.transition is None  # within the cooldown
    assert decision.runs == () and decision.cursor.in_flight[0].run_key == "k#1"
    assert StreamCursor.from_json(decision.cursor.to_json()) == decision.cursor
