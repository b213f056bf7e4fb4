"""Kafka -> Iceberg exactly once, driven by the real stream sensor in a real Dagster instance."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys

import pytest
from dagster import DagsterInstance
from kafka import TopicPartition

from k2_assets.cli import main as k2
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.kafka_outputs import CONSUMER_GROUP
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_sensors.binance.driver import drive, tick
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.stream import (
    FOLLOWER,
    PER_RANGE,
    assert_contiguous,
    both_sink_modes,
    execute_in_background,
    follower_endings,
    range_commits,
    requested_modes,
    stream_defs,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


def iceberg_trade_ids(iceberg: IcebergResource) -> list[str]:
    return iceberg.trades().scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist()


def _topic_exists(kafka: KafkaResource, topic: str) -> bool:
    admin = kafka.admin()
    try:
        return topic in admin.list_topics()
    finally:
        admin.close()


def recreate_topic(kafka: KafkaResource, topic: str) -> None:
    """Delete the topic and create it again, empty: what a recreated topic or cluster looks like."""
    admin = kafka.admin()
    admin.delete_topics([topic])
    admin.close()
    wait_for(lambda: not _topic_exists(kafka, topic), timeout_s=60, what=f"topic {topic} deleted")
    kafka.ensure_topic(topic, partitions=3)


@pytest.fixture
def stream_topic(kafka_broker, topic_name) -> str:
    KafkaResource().ensure_topic(topic_name, partitions=3)
    return topic_name


@both_sink_modes
def test_every_trade_lands_once_and_rerun_writes_nothing(k2_home, kafka_broker, stream_topic, sink_mode):
    records = recorded_trades(6000)
    kafka, iceberg = KafkaResource(), IcebergResource()
    produce(kafka, stream_topic, records)
    defs = stream_defs(stream_topic, max_batch=700, sink_mode=sink_mode)

    with DagsterInstance.ephemeral() as instance:
        report = drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=600)
        # 3 partitions of 2000 messages in ranges of at most 700: 9 commits, by 9 runs or one follower
        commits = range_commits(iceberg.trades(), stream_topic)
        assert len(commits) == 9, commits
        assert_contiguous(commits)
        # a follower that ran its time before the last cycle hands over to another one
        assert report.runs == 9 if sink_mode == PER_RANGE else 1 <= report.runs <= 9
        assert report.failed_runs == 0
        assert report.last_checks["consumer_lag"]["passed"] is True
        assert report.last_checks["offset_baseline"]["passed"] is True

    ids = iceberg_trade_ids(iceberg)
    assert len(ids) == len(records)
    assert sorted(ids) == sorted(r["trade_id"] for r in records)
    assert committed_offsets(iceberg.trades(), stream_topic) == kafka.end_offsets(stream_topic)

    # Re-running a committed range is a no-op.
    snapshot_before = iceberg.trades().current_snapshot().snapshot_id
    again = run_microbatch(kafka, iceberg, OffsetRange(stream_topic, 0, 0, 700))
    assert again.already_committed and again.written == 0
    assert iceberg.trades().current_snapshot().snapshot_id == snapshot_before

    # The snapshot summary records the range it covers.
    summary = iceberg.trades().current_snapshot().summary.additional_properties
    assert summary["k2.kafka.topic"] == stream_topic
    assert int(summary["k2.kafka.end-offset"]) > int(summary["k2.kafka.start-offset"])


def _die_before_commit(topic: str, k2_home: str, bootstrap: str) -> None:
    os.environ["K2_HOME"], os.environ["K2_KAFKA_BOOTSTRAP"] = k2_home, bootstrap
    run_microbatch(
        KafkaResource(), IcebergResource(), OffsetRange(topic, 0, 0, 500), before_commit=lambda: os._exit(137)
    )


@both_sink_modes
def test_batch_killed_half_way_then_rerun_leaves_no_duplicates_and_no_gaps(
    k2_home, kafka_broker, stream_topic, sink_mode
):
    records = recorded_trades(3000)
    kafka, iceberg = KafkaResource(), IcebergResource()
    produce(kafka, stream_topic, records)

    # A real process reads its range and dies just before its Iceberg commit.
    process = multiprocessing.get_context("spawn").Process(
        target=_die_before_commit, args=(stream_topic, str(k2_home), kafka_broker.bootstrap_servers)
    )
    process.start()
    process.join(timeout=180)
    assert process.exitcode == 137
    assert committed_offsets(iceberg.trades(), stream_topic) == {}

    # A run that dies right after its Iceberg commit, before moving the consumer group.
    first = run_microbatch(kafka, iceberg, OffsetRange(stream_topic, 1, 0, 400))
    assert first.written == 400

    with DagsterInstance.ephemeral() as instance:
        defs = stream_defs(stream_topic, max_batch=1000, sink_mode=sink_mode)
        drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=600)

    ids = iceberg_trade_ids(iceberg)
    assert len(ids) == len(set(ids)) == len(records)
    assert set(ids) == {r["trade_id"] for r in records}
    assert_contiguous(range_commits(iceberg.trades(), stream_topic))


FOLLOWING_LONG_S = 240  # a follower that would run this long unless something ends it sooner


@both_sink_modes
def test_recreated_topic_stops_batches_and_fails_the_baseline_check(k2_home, kafka_broker, stream_topic, sink_mode):
    kafka, iceberg = KafkaResource(), IcebergResource()
    produce(kafka, stream_topic, recorded_trades(600))
    defs = stream_defs(stream_topic, max_batch=1000, sink_mode=sink_mode, follow_seconds=FOLLOWING_LONG_S)
    with DagsterInstance.ephemeral() as instance:
        if sink_mode == FOLLOWER:
            # The topic is recreated under a running follower: it stops at its next cycle, not at its time.
            first = tick(instance, defs, None)
            assert requested_modes(first) == ["follow"]
            follower = execute_in_background(instance, defs, first)
            wait_for(
                lambda: sum(committed_offsets(iceberg.trades(), stream_topic).values()) == 600,
                timeout_s=240,
                what="the follower to commit the 600 trades",
            )
            recreate_topic(kafka, stream_topic)
            assert follower.join(timeout_s=FOLLOWING_LONG_S / 2) == (1, [])
            assert follower_endings(instance) == ["topic offsets below the table's"]
            produce(kafka, stream_topic, recorded_trades(20))
        else:
            drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300)
            # The table now claims offsets the recreated topic does not have.
            recreate_topic(kafka, stream_topic)
            produce(kafka, stream_topic, recorded_trades(20))

        result = tick(instance, defs, None)
        assert result.run_requests == []
        baseline = {e.check_name: e for e in result.asset_events}["offset_baseline"]
        assert baseline.passed is False
        assert "recreated" in baseline.metadata["fix"].value
        assert "committed up to" in baseline.metadata["mismatch"].value


@both_sink_modes
def test_new_baseline_after_recreation_loads_the_new_topic_from_its_start(
    k2_home, kafka_broker, stream_topic, sink_mode
):
    kafka, iceberg = KafkaResource(), IcebergResource()
    old = recorded_trades(900)
    produce(kafka, stream_topic, old)
    defs = stream_defs(stream_topic, max_batch=1000, sink_mode=sink_mode)
    with DagsterInstance.ephemeral() as instance:
        drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300)
    recreate_topic(kafka, stream_topic)
    new = recorded_trades(1500)[1200:]  # ETHUSDT trades 450..749: 300 the table has not seen
    produce(kafka, stream_topic, new)

    assert k2(["offsets", "reset", "--topic", stream_topic, "--yes"]) == 0
    assert committed_offsets(iceberg.trades(), stream_topic) == {0: 0, 1: 0, 2: 0}
    with DagsterInstance.ephemeral() as instance:
        report = drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300)
        assert report.last_checks["offset_baseline"]["passed"] is True
    ids = iceberg_trade_ids(iceberg)
    assert len(ids) == len(set(ids)) == len(old) + len(new)
    assert set(ids) == {r["trade_id"] for r in old + new}


# A run of partition 1's range [0, 400) in a process of its own (importing no test module),
# stopped on entering the consumer-group commit: after its Iceberg commit, before the group moves.
STOPPED_RUN = """
import sys
from pathlib import Path
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.kafka_outputs import commit_consumer_group
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from tests.support.breakpoints import stop_on_entry

stop_on_entry(commit_consumer_group, Path(sys.argv[2]))
run_microbatch(KafkaResource(), IcebergResource(), OffsetRange(sys.argv[1], 1, 0, 400))
"""


def _group_offsets(kafka: KafkaResource, topic: str) -> dict[int, int | None]:
    consumer = kafka.consumer(group_id=CONSUMER_GROUP)
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(kafka.end_offsets(topic))]
        return {tp.partition: consumer.committed(tp) for tp in partitions}
    finally:
        consumer.close()


def test_run_killed_between_its_iceberg_commit_and_the_group_commit_is_repaired_exactly_once(
    k2_home, kafka_broker, stream_topic, tmp_path
):
    records = recorded_trades(3000)
    kafka, iceberg = KafkaResource(), IcebergResource()
    produce(kafka, stream_topic, records)
    barrier = tmp_path / "stopped-before-group-commit"

    # A real process runs a range and is stopped on entering the consumer-group commit.
    environment = dict(os.environ, K2_HOME=str(k2_home), K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers)
    log = (tmp_path / "stopped-run.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPED_RUN, stream_topic, str(barrier)], env=environment, stderr=log
    )

    def stopped() -> bool:
        assert process.poll() is None, (tmp_path / "stopped-run.log").read_text()[-3000:]
        return barrier.exists()

    try:
        wait_for(stopped, timeout_s=180, what="the run to reach the consumer-group commit")
        # The kill lands exactly there: the Iceberg commit is in, the consumer group has not moved.
        assert committed_offsets(IcebergResource().trades(), stream_topic) == {1: 400}
        assert _group_offsets(kafka, stream_topic) == {0: None, 1: None, 2: None}
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)
        log.close()

    with DagsterInstance.ephemeral() as instance:
        drive(instance, stream_defs(stream_topic, max_batch=1000), until=lambda r: r.lag == 0, timeout_s=600)

    ids = iceberg_trade_ids(iceberg)
    assert len(ids) == len(set(ids)) == len(records)  # no duplicate of the killed run's 400 rows
    assert set(ids) == {r["trade_id"] for r in records}  # and no gap
    ends = kafka.end_offsets(stream_topic)
    assert committed_offsets(iceberg.trades(), stream_topic) == ends
    assert _group_offsets(kafka, stream_topic) == ends  # the group caught up after the re-run
