"""One dead-letter contract, one tool: a streamer's dead letter (a WebSocket frame) and a sink's (an
Avro record) written to the same .dlq topic are both read back by `k2 kafka dead-letters`, in a new
process, with their reason, stage and source."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from k2_resources.kafka.dead_letters import SINK, STREAM, dead_letter, send_dead_letter
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic

pytestmark = pytest.mark.integration


def test_k2_kafka_dead_letters_reads_what_the_streamer_and_the_sink_wrote(
    kafka_broker, k2_home: Path, topic_name: str
) -> None:
    kafka = KafkaResource()
    dlq = dead_letter_topic(topic_name)
    kafka.ensure_topic(dlq, partitions=1)
    frame = '{"stream":"btcusdt@trade","data":{"e":"trade","t":"not a number"}}'
    avro = b"\x00\x00\x00\x00\x01\xff\xfe"
    producer = kafka.producer()
    try:
        send_dead_letter(producer, dlq, dead_letter(frame, "malformed", "t is not a number", STREAM))
        send_dead_letter(
            producer,
            dlq,
            dead_letter(avro, "undecodable", "bad Avro", SINK, topic=topic_name, partition=0, offset=41),
        )
        producer.flush()
    finally:
        producer.close()

    result = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "kafka", "dead-letters", "--topic", topic_name],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "K2_KAFKA_BOOTSTRAP": kafka_broker.bootstrap_servers},
    )
    assert result.returncode == 0, result.stderr
    letters = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(letter["stage"], letter["reason"]) for letter in letters] == [
        (STREAM, "malformed"),
        (SINK, "undecodable"),
    ]
    assert letters[0]["raw"] == frame and letters[0]["detail"] == "t is not a number"
    assert base64.b64decode(letters[1]["raw_base64"]) == avro
    assert (letters[1]["source_topic"], letters[1]["source_partition"], letters[1]["source_offset"]) == (
        topic_name,
        0,
        41,
    )
    assert all(letter["topic"] == dlq for letter in letters)
