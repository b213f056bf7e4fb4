"""The spool's retriable-failure branches on a real broker: a replayed record whose delivery times out
is sent again, and a direct record whose delivery times out is spooled; in both, each partition of
the topic ends up holding every record exactly once and in the order it was handed over.

A partition "stalls" in front of the real producer (tests/support/stalling_producer.py): its records
are held, then expire oldest first with the retriable KafkaTimeoutError, as kafka-python's delivery
timeout does to a partition's queue; the other partitions carry on to the broker meanwhile."""

from __future__ import annotations

import pytest
from kafka import TopicPartition

from k2_resources.kafka.outbox import TopicOutbox
from k2_resources.kafka.resource import KafkaResource
from tests.support.stalling_producer import StallingProducer, key_for
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PARTITIONS = 3
STALLED = 0


def _send(outbox: TopicOutbox, numbers: range) -> None:
    for number in numbers:
        outbox.send(str(number).encode(), key=key_for(number % PARTITIONS))


def _per_partition(kafka: KafkaResource, topic: str) -> dict[int, list[int]]:
    """Each partition's values in offset order, read to the end offsets."""
    ends = kafka.end_offsets(topic)
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in ends]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    found: dict[int, list[int]] = {p: [] for p in ends}

    def read_to_end() -> bool:
        for tp, records in consumer.poll(timeout_ms=500).items():
            found[tp.partition].extend(int(r.value) for r in records)
        return all(consumer.position(tp) >= ends[tp.partition] for tp in partitions)

    wait_for(read_to_end, timeout_s=60, what=f"reading {topic} to {ends}", interval_s=0)
    consumer.close()
    return found


def _assert_each_once_in_order(kafka: KafkaResource, topic: str, sent: int) -> None:
    found = _per_partition(kafka, topic)
    for partition, values in found.items():
        expected = [n for n in range(sent) if n % PARTITIONS == partition]
        assert values == expected, f"partition {partition}: {values} (expected {expected})"


def _drain(outbox: TopicOutbox, stalling: StallingProducer) -> None:
    """End the stall (what is held goes to the broker in order) and wait until Kafka has every record."""
    stalling.release()
    assert outbox.wait_drained(60), f"not drained: {outbox.buffered()} in flight, {outbox.spool_pending()} spooled"


@pytest.fixture
def topic(kafka_broker, topic_name) -> str:
    KafkaResource().ensure_topic(topic_name, partitions=PARTITIONS)
    return topic_name


def test_a_replayed_record_that_times_out_is_sent_again_in_order(kafka_broker, topic, tmp_path) -> None:
    kafka = KafkaResource()
    # A run that met no broker at all: every record went to the spool, which it left for the next run.
    offline = StallingProducer(kafka.producer())
    offline.no_metadata = True
    first_run = TopicOutbox(offline, topic, tmp_path / "spool")
    _send(first_run, range(60))
    assert not first_run.close(timeout_s=0.5) and first_run.spool_pending() == 60
    offline.close()

    stalling = StallingProducer(kafka.producer())
    stalling.stalled.add(STALLED)
    outbox = TopicOutbox(stalling, topic, tmp_path / "spool", retry_backoff_s=0.05)  # replays at once
    try:
        wait_for(lambda: len(stalling.held()) == 20, timeout_s=30, what="the stalled partition's replayed records")
        # The stall outlasts the delivery timeout: the whole queue expires, oldest first, and is sent again.
        expired = stalling.expire_held()
        assert [int(v) for v in expired] == list(range(0, 60, 3))
        wait_for(lambda: len(stalling.held()) == 20, timeout_s=30, what="the expired records sent again")
        assert stalling.held() == expired and outbox.stats.replayed == 80
        _send(outbox, range(60, 90))  # new records queue behind the replay
        _drain(outbox, stalling)
        _assert_each_once_in_order(kafka, topic, 90)
        assert outbox.stats.failed == 0 and not any((tmp_path / "spool").iterdir())
    finally:
        outbox.close(timeout_s=5)
        stalling.close()


def test_a_direct_record_that_times_out_is_spooled_without_reordering_its_partition(
    kafka_broker, topic, tmp_path
) -> None:
    kafka = KafkaResource()
    stalling = StallingProducer(kafka.producer())
    outbox = TopicOutbox(stalling, topic, tmp_path / "spool", retry_backoff_s=0.05)
    try:
        _send(outbox, range(30))
        assert outbox.wait_drained(30) and outbox.stats.sent_direct == 30
        stalling.stalled.add(STALLED)
        _send(outbox, range(30, 60))  # sent directly; partition 0's ten wait in its queue
        wait_for(lambda: outbox.buffered() == 10, timeout_s=30, what="the other partitions' records acknowledged")
        assert stalling.held() == [str(n).encode() for n in range(30, 60, 3)]
        stalling.expire_held(5)  # the first batch of partition 0 times out (30..42): spooled
        assert outbox.spooling
        _send(outbox, range(60, 90))  # while spooling: into the spool
        stalling.expire_held(5)  # ... then the second batch (45..57) times out too
        assert outbox.stats.spooled == 40
        _drain(outbox, stalling)
        _assert_each_once_in_order(kafka, topic, 90)
        assert outbox.stats.failed == 0
    finally:
        outbox.close(timeout_s=5)
        stalling.close()
