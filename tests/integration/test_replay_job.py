"""Scheduled replays: one ASX day re-played in order into a Kafka topic; twice equals once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from dagster import DagsterInstance, build_schedule_context
from kafka import TopicPartition

from k2_assets.operations.replays import trades_replay, trades_replay_nightly
from k2_resources.asx.files import default_data_dir
from k2_resources.asx.writes import ingest_day
from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import replay_trades_topic
from k2_resources.operations.replay_topic import ReplaySpec, replay_to_kafka
from k2_resources.schemas import decode_trade
from k2_resources.trades.time_ordered import TimeOrderedReader

pytestmark = pytest.mark.integration

DAY = "2014-03-11"
DAY_TRADES = 21_681 + 43 + 3 + 34_488  # BHP, DVN, MWR, RIO on 11 March (data/asx/SOURCE.md)


def topic_content(kafka: KafkaResource, topic: str) -> list[tuple[str, datetime, int]]:
    consumer = kafka.consumer()
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_beginning(partition)
    end = consumer.end_offsets([partition])[partition]
    content = []
    while len(content) < end:
        for message in consumer.poll(timeout_ms=1000).get(partition, []):
            record = decode_trade(message.value)
            content.append((record["message_id"], record["timestamp"], int(dict(message.headers)["k2.replay.seq"])))
    consumer.close()
    return content


def run_replay(topic: str):
    return trades_replay.execute_in_process(
        run_config={"ops": {"replay_trades": {"config": {"topic": topic}}}},
        resources={"kafka": KafkaResource(), "iceberg": IcebergResource()},
        instance=DagsterInstance.ephemeral(),
    )


def test_replaying_one_asx_day_reproduces_its_trades_in_order_and_twice_equals_once(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    ingest_day(default_data_dir(), iceberg, "trades", DAY)

    assert run_replay(topic_name).success
    once = topic_content(kafka, topic_name)
    assert len(once) == DAY_TRADES
    assert [seq for _, _, seq in once] == list(range(DAY_TRADES))
    assert all(a[1] <= b[1] for a, b in zip(once, once[1:]))  # time order
    stored = iceberg.trades().scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist()
    assert sorted(m for m, _, _ in once) == sorted(stored)

    assert run_replay(topic_name).success
    assert topic_content(kafka, topic_name) == once


def test_a_replay_killed_half_way_is_completed_by_running_it_again(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    ingest_day(default_data_dir(), iceberg, "trades", DAY)
    start = datetime(2014, 3, 11, 2, 0, tzinfo=UTC)
    spec = ReplaySpec(topic=topic_name, start=start, end=start + timedelta(hours=1), symbols=("BHP",))

    partial = replay_to_kafka(spec, kafka, TimeOrderedReader(iceberg), limit=500)
    assert partial.produced == 500
    rest = replay_to_kafka(spec, kafka, TimeOrderedReader(iceberg))
    assert rest.already_in_topic == 500 and rest.produced == rest.total - 500
    content = topic_content(kafka, topic_name)
    assert len(content) == len({m for m, _, _ in content}) == rest.total > 500

    other = ReplaySpec(topic=topic_name, start=start, end=start + timedelta(hours=2))
    with pytest.raises(K2Error, match="another replay"):
        replay_to_kafka(other, kafka, TimeOrderedReader(iceberg))


def test_paced_replay_sleeps_by_the_speed_factor_without_waiting(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    ingest_day(default_data_dir(), iceberg, "trades", DAY)
    start = datetime(2014, 3, 11, 2, 0, tzinfo=UTC)
    spec = ReplaySpec(topic=topic_name, start=start, end=start + timedelta(minutes=10), symbols=("RIO",))
    now = [0.0]
    result = replay_to_kafka(
        spec,
        kafka,
        TimeOrderedReader(iceberg),
        speed=60.0,
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
    )
    content = topic_content(kafka, topic_name)
    span = (content[-1][1] - content[0][1]).total_seconds()
    assert result.produced == len(content) > 0
    assert now[0] == pytest.approx(span / 60.0, rel=1e-6)  # ten minutes of trades in about ten seconds


def test_nightly_schedule_replays_the_previous_utc_day_into_its_own_topic():
    context = build_schedule_context(scheduled_execution_time=datetime(2026, 11, 25, 2, 30, tzinfo=UTC))
    request = trades_replay_nightly(context)
    config = request.run_config["ops"]["replay_trades"]["config"]
    assert config["topic"] == replay_trades_topic("2026-11-24")
    assert config["start"] == "2026-11-24T00:00:00+00:00" and config["end"] == "2026-11-25T00:00:00+00:00"
