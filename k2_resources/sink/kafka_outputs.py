"""What a micro-batch writes to Kafka: its dead letters and its consumer group's offset."""

from __future__ import annotations

import json

from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from k2_resources import metrics
from k2_resources.kafka.dead_letters import SINK, dead_letter, send_dead_letter
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.sink.offsets import OffsetRange

CONSUMER_GROUP = "k2-iceberg-sink"


def reason_code(reason: str) -> str:
    """The dead-letter code of a decode reason ("undecodable: ...", "unstorable in market.trades: ...")."""
    return reason.split(":", 1)[0].split(" ", 1)[0]


def send_dead_letters(kafka: KafkaResource, batch: OffsetRange, dead: list[tuple[int, bytes, str]]) -> None:
    """Messages of ``batch`` that do not decode or cannot be stored, to ``<topic>.dlq``
    (k2_resources.kafka.dead_letters: the message as the value, reason and origin in headers)."""
    if not dead:
        return
    producer = kafka.producer()
    try:
        for offset, raw, reason in dead:
            letter = dead_letter(
                raw, reason_code(reason), reason, SINK, topic=batch.topic, partition=batch.partition, offset=offset
            )
            send_dead_letter(producer, dead_letter_topic(batch.topic), letter)
        producer.flush()
    finally:
        producer.close()
    metrics.DEAD_LETTERS.labels(batch.topic).inc(len(dead))


def commit_consumer_group(kafka: KafkaResource, batch: OffsetRange, group_id: str = CONSUMER_GROUP) -> None:
    """Move the consumer group to the batch end, so Kafka's own tools show the sink's lag too."""
    consumer = kafka.consumer(group_id=group_id)
    partition = TopicPartition(batch.topic, batch.partition)
    try:
        consumer.assign([partition])
        current = consumer.committed(partition)
        if current is None or current < batch.end:
            consumer.commit({partition: OffsetAndMetadata(batch.end, json.dumps({"k2": batch.key}), -1)})
    finally:
        consumer.close()
