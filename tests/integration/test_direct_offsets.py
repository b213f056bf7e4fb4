"""On a real broker, the direct offset look-ups answer exactly what kafka-python's consumer answers,
decline what they do not cover, and the hybrid tail then still answers through kafka-python."""

from __future__ import annotations

import pytest
from kafka import TopicPartition

from k2_resources.kafka.columnar_fetch import FastFetchUnavailable
from k2_resources.kafka.direct_offsets import DirectOffsets
from k2_resources.kafka.resource import KafkaResource
from k2_resources.trades.kafka_tail import KafkaTail

PARTITIONS = 3
BASE_MS = 1_700_000_000_000  # message timestamps: BASE_MS + 1000 * index


@pytest.mark.timeout(120)
def test_direct_answers_equal_kafka_pythons_and_unknown_topics_fall_back(kafka_broker, topic_name):
    kafka = KafkaResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS, config={"retention.ms": "-1"})
    producer = kafka.producer()
    for index in range(30):  # partition p holds 10, 10, 10 messages at distinct times
        producer.send(topic_name, value=b"x", partition=index % PARTITIONS, timestamp_ms=BASE_MS + 1000 * index)
    producer.flush()
    producer.close()

    consumer = kafka.consumer(group_id=None)
    direct = DirectOffsets(kafka.servers, "k2-test", 3.0)
    try:
        assert direct.partitions(topic_name) == sorted(consumer.partitions_for_topic(topic_name)) == [0, 1, 2]
        tps = [TopicPartition(topic_name, p) for p in range(PARTITIONS)]
        assert direct.end_offsets(topic_name, [0, 1, 2]) == {
            tp.partition: o for tp, o in consumer.end_offsets(tps).items()
        }
        for moment in (0, BASE_MS + 14_500, BASE_MS + 29_000, BASE_MS + 60_000):
            expected = consumer.offsets_for_times({tp: moment for tp in tps})
            assert direct.offsets_for_time(topic_name, [0, 1, 2], moment) == {
                tp.partition: None if hit is None else hit.offset for tp, hit in expected.items()
            }
        # BASE_MS + 14.5 s: index 15.. -> partition 0 from index 15 (offset 5), 1 from 16 (5), 2 from 17 (5)
        assert direct.offsets_for_time(topic_name, [0, 1, 2], BASE_MS + 14_500) == {0: 5, 1: 5, 2: 5}
        assert direct.offsets_for_time(topic_name, [1], BASE_MS + 60_000) == {1: None}  # nothing that late
        with pytest.raises(FastFetchUnavailable):
            direct.partitions(f"{topic_name}-missing")  # the broker answers UNKNOWN_TOPIC: not covered
    finally:
        direct.close()
        consumer.close()

    tail = KafkaTail(kafka)
    try:
        assert tail.partitions(topic_name) == [0, 1, 2]
        assert tail._consumer is None  # answered directly: kafka-python's consumer was never started
        assert tail.partitions(f"{topic_name}-missing") == []  # declined directly, answered by kafka-python
        assert tail._consumer is not None
        assert tail.end_offsets(topic_name, [0, 1, 2]) == {0: 10, 1: 10, 2: 10}  # direct again afterwards
        assert tail._direct is not None
    finally:
        tail.close()
