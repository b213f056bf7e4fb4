"""Replays of market.trades into a Kafka topic, idempotently.

A replay topic has one partition, so its log is the replay's order. Every message carries
headers naming the replay and its position::

    k2.replay.id     hash of (symbols, window, exchange): which replay wrote the topic
    k2.replay.seq    0-based position of the trade in the replay's order
    k2.replay.snapshot  the Iceberg snapshot replayed

Before producing, the writer reads the topic's last message: the same replay resumes after
its last sequence number (a finished replay writes nothing), another replay's topic is
refused. With the reader's deterministic order (timestamp, source_sequence, ...) and the
idempotent producer, running a replay twice leaves the same topic content as running it once,
and a replay killed half-way is completed by running it again.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from kafka import TopicPartition

from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import REPLAY
from k2_resources.schemas import encode_trade
from k2_resources.trades.time_ordered import TimeOrderedReader

REPLAY_ID = "k2.replay.id"
REPLAY_SEQ = "k2.replay.seq"
REPLAY_SNAPSHOT = "k2.replay.snapshot"


@dataclass(frozen=True)
class ReplaySpec:
    """What to replay and where to."""

    topic: str
    start: datetime
    end: datetime
    symbols: tuple[str, ...] | None = None
    exchange: str | None = None

    @property
    def replay_id(self) -> str:
        identity = json.dumps(
            [
                sorted(self.symbols) if self.symbols else None,
                self.start.isoformat(),
                self.end.isoformat(),
                self.exchange,
            ]
        )
        return hashlib.sha256(identity.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ReplayResult:
    topic: str
    replay_id: str
    already_in_topic: int
    produced: int
    total: int
    snapshot_id: int | None


def _last_message_headers(kafka: KafkaResource, topic: str) -> tuple[int, dict[str, str]]:
    """(end offset, headers of the last message) of the topic's only partition."""
    consumer = kafka.consumer()
    partition = TopicPartition(topic, 0)
    try:
        consumer.assign([partition])
        end = consumer.end_offsets([partition])[partition]
        if end == 0:
            return 0, {}
        consumer.seek(partition, end - 1)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for message in consumer.poll(timeout_ms=500).get(partition, []):
                if message.offset == end - 1:
                    return end, {key: value.decode() for key, value in (message.headers or [])}
        raise K2Error(f"could not read the last message of {topic} within 30 s; is the broker healthy?")
    finally:
        consumer.close()


def replay_to_kafka(
    spec: ReplaySpec,
    kafka: KafkaResource,
    reader: TimeOrderedReader,
    speed: float | None = None,
    limit: int | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayResult:
    """Replay the window into ``spec.topic`` (resuming a partial replay); ``limit`` stops early (tests)."""
    kafka = kafka.as_role(REPLAY)  # on a secured cluster: the replay principal, which may write replay topics
    kafka.ensure_topic(spec.topic, partitions=1)
    end, headers = _last_message_headers(kafka, spec.topic)
    if end and headers.get(REPLAY_ID) != spec.replay_id:
        raise K2Error(
            f"topic {spec.topic} already holds {end} messages of another replay "
            f"({headers.get(REPLAY_ID, 'not a K2 replay')}); "
            "choose another topic name or delete that topic first"
        )
    done = int(headers[REPLAY_SEQ]) + 1 if end else 0
    producer = kafka.producer()
    produced = total = 0
    paced_from: tuple[float, datetime] | None = None
    try:
        for sequence, record in enumerate(reader.records(spec.symbols, spec.start, spec.end, exchange=spec.exchange)):
            total = sequence + 1
            if sequence < done:
                continue  # already in the topic from an earlier run of this replay
            if limit is not None and produced >= limit:
                break
            if speed is not None:
                if paced_from is None:
                    paced_from = (clock(), record["timestamp"])
                due = paced_from[0] + (record["timestamp"] - paced_from[1]).total_seconds() / speed
                if due > clock():
                    sleep(due - clock())
            producer.send(
                spec.topic,
                key=record["symbol"].encode(),
                value=encode_trade(record),
                partition=0,
                headers=[
                    (REPLAY_ID, spec.replay_id.encode()),
                    (REPLAY_SEQ, str(sequence).encode()),
                    (REPLAY_SNAPSHOT, str(reader.progress.snapshot_id).encode()),
                ],
            )
            produced += 1
        producer.flush()
    finally:
        producer.close()
    return ReplayResult(spec.topic, spec.replay_id, done, produced, total, reader.progress.snapshot_id)
