"""The follower: when the sensor asks for one instead of runs per range, how it supervises it, and
when the follower's loop hands control back (pure rules and the loop with its I/O stubbed)."""

from __future__ import annotations

import pytest

from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink import follow
from k2_resources.sink.follow import BEHIND, MEMORY, RECREATED, ROTATED, FollowSettings, follow_topic, plan_cycle
from k2_resources.sink.microbatch import BatchResult
from k2_resources.sink.offsets import DEFERRED, OffsetRange, PendingRange
from k2_sensors.binance.stream_cursor import RUN_ACTIVE, RUN_FAILED, RUN_SUCCEEDED, InFlight, StreamCursor
from k2_sensors.binance.stream_observation import Observation, StreamOffsets
from k2_sensors.binance.stream_planning import FOLLOW, INGEST, StreamSettings, decide

TOPIC = BINANCE_TRADES_TOPIC
FOLLOWING = StreamSettings(
    TOPIC,
    max_batch_messages=100,
    retry_after_s=300,
    lag_warn_messages=10**9,
    lag_error_messages=10**9,
    follow_seconds=600,
)


def observe(ends, committed, run_status=None, pending=()) -> Observation:
    return Observation(StreamOffsets(TOPIC, ends, committed, tuple(pending)), run_status=run_status or {})


def test_at_normal_with_new_data_the_sensor_requests_one_follower_instead_of_ranges():
    decision = decide(observe({0: 50, 1: 70}, {}), StreamCursor(), FOLLOWING, now=1.0)
    assert [run.mode for run in decision.runs] == [FOLLOW]
    assert decision.cursor.follower is not None and decision.cursor.follower.run_key == decision.runs[0].run_key
    assert decision.cursor.in_flight == {}


def test_following_off_or_nothing_new_means_no_follower():
    off = StreamSettings(TOPIC, 100, 300, 10**9, 10**9)
    assert [run.mode for run in decide(observe({0: 50}, {}), StreamCursor(), off, now=1.0).runs] == [INGEST]
    assert decide(observe({0: 50}, {0: 50}), StreamCursor(), FOLLOWING, now=1.0).runs == ()


def test_no_range_is_requested_while_the_follower_is_queued_or_running_and_a_finished_one_is_replaced():
    cursor = decide(observe({0: 50}, {}), StreamCursor(), FOLLOWING, now=1.0).cursor
    key = cursor.follower.run_key
    assert decide(observe({0: 500}, {0: 50}), cursor, FOLLOWING, now=2.0).runs == ()  # not visible yet
    assert decide(observe({0: 500}, {0: 50}, {key: RUN_ACTIVE}), cursor, FOLLOWING, now=400.0).runs == ()
    for ended in (RUN_SUCCEEDED, RUN_FAILED):
        again = decide(observe({0: 500}, {0: 50}, {key: ended}), cursor, FOLLOWING, now=500.0)
        assert [run.mode for run in again.runs] == [FOLLOW] and again.cursor.follower.run_key != key


def test_ranges_in_flight_or_pending_ranges_keep_runs_per_range():
    in_flight = StreamCursor(in_flight={0: InFlight(0, 50, "r#1", 0.0)})
    assert decide(observe({0: 80}, {0: 10}, {"r#1": RUN_ACTIVE}), in_flight, FOLLOWING, now=1.0).runs == ()
    # once the table has the range, the next tick asks for a follower
    assert [r.mode for r in decide(observe({0: 80}, {0: 50}), in_flight, FOLLOWING, now=2.0).runs] == [FOLLOW]
    pending = [PendingRange(TOPIC, 1, 0, 10, DEFERRED, ("X",), 3)]
    runs = decide(observe({0: 80}, {0: 50, 1: 10}, pending=pending), StreamCursor(), FOLLOWING, now=1.0).runs
    assert FOLLOW not in [run.mode for run in runs]


def test_above_normal_the_sensor_plans_ranges_at_the_level():
    lag = FOLLOWING.thresholds.lag_messages[0] + 1
    decision = decide(observe({0: lag}, {}), StreamCursor(), FOLLOWING, now=1.0)
    assert decision.level > 0 and [run.mode for run in decision.runs] == [INGEST]


def test_the_follower_survives_the_cursor_round_trip():
    cursor = decide(observe({0: 50}, {}), StreamCursor(), FOLLOWING, now=1.0).cursor
    assert StreamCursor.from_json(cursor.to_json()) == cursor
    assert StreamCursor.from_json(StreamCursor().to_json()).follower is None


def test_a_cycle_takes_each_partition_from_its_committed_offset_at_most_a_batch():
    ranges = plan_cycle(TOPIC, {}, {0: 250, 1: 40, 2: 7}, {0: 100, 2: 7}, 100)
    assert [(r.partition, r.start, r.end) for r in ranges] == [(0, 100, 200), (1, 0, 40)]


class FakeLog:
    """Kafka's end offsets per cycle and the table's committed offsets (moved by each commit)."""

    def __init__(self, ends_per_cycle: list[dict[int, int]]) -> None:
        self.ends_per_cycle, self.cycle, self.committed = ends_per_cycle, -1, {}

    def offset_bounds(self, topic):
        self.cycle += 1
        return {}, self.ends_per_cycle[min(self.cycle, len(self.ends_per_cycle) - 1)]

    def consumer(self):
        return type("Consumer", (), {"close": lambda self: None})()


@pytest.fixture
def fake_log(monkeypatch):
    def run(ends_per_cycle, settings, memory=0.0, clock_step=0.5):
        log, committed = FakeLog(ends_per_cycle), []
        now = [0.0]

        def microbatch(kafka, iceberg, batch: OffsetRange, **_):
            already = log.committed.get(batch.partition, 0) >= batch.end
            log.committed[batch.partition] = max(log.committed.get(batch.partition, 0), batch.end)
            return BatchResult(batch, batch.end - batch.start, 0, already, 1, 0.1)

        def clock():
            now[0] += clock_step
            return now[0]

        monkeypatch.setattr(follow, "run_microbatch", microbatch)
        monkeypatch.setattr(follow, "committed_offsets", lambda table, topic: dict(log.committed))
        iceberg = type("Iceberg", (), {"trades": lambda self: None})()
        outcome = follow_topic(
            log,
            iceberg,
            TOPIC,
            settings,
            committed.append,
            memory_percent=lambda: memory,
            clock=clock,
            pause=lambda s: None,
        )
        return outcome, [(r.batch.partition, r.batch.start, r.batch.end) for r in committed], log

    return run


def test_the_follower_commits_consecutive_ranges_until_its_time_is_up(fake_log):
    outcome, ranges, log = fake_log(
        [{0: 10, 1: 5}, {0: 10, 1: 5}, {0: 30, 1: 5}], FollowSettings(run_for_s=5, max_lag_messages=1000)
    )
    assert outcome.reason == ROTATED
    assert ranges == [(0, 0, 10), (1, 0, 5), (0, 10, 30)]  # nothing new: nothing committed
    assert outcome.commits == 3 and outcome.rows_written == 35 and log.committed == {0: 30, 1: 5}


def test_the_follower_hands_back_when_behind_when_memory_is_high_or_the_topic_went_backwards(fake_log):
    behind, ranges, _ = fake_log([{0: 1000}], FollowSettings(max_batch_messages=100, max_lag_messages=500))
    assert behind.reason == BEHIND and ranges == [(0, 0, 100)]
    memory, _, _ = fake_log([{0: 10}], FollowSettings(memory_limit_percent=70), memory=75.0)
    assert memory.reason == MEMORY
    recreated, ranges, _ = fake_log([{0: 10}, {0: 3}], FollowSettings(run_for_s=100))
    assert recreated.reason == RECREATED and ranges == [(0, 0, 10)]
