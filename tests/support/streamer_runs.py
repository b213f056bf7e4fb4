"""Running the Binance streamer against the local recording server, and reading back what it wrote.

Shared by the crash-restart and gap-fill tests: the streamer as a process of its own (what
`k2 stream binance --url <server>` runs, without the reachability probe and its fallback to the
bundled recording), killed at points, and the topic read back to compare with what the feed sent.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from kafka import TopicPartition

from k2_resources.binance.recording_server import RecordedTrade, load_recorded_trades
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.paths import PROJECT_ROOT
from k2_resources.schemas import decode_trade
from tests.support.waiting import wait_for

RECORDING_2024_MS = 1_722_000_000_000  # the 2024 recording: both symbols, consecutive ids each

STREAMER = """
import json, logging, sys
from k2_resources.binance.streamer import stream_to_kafka
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
logging.getLogger("kafka").setLevel(logging.WARNING)
url, topic, dlq = sys.argv[1:4]
stats = stream_to_kafka(url, topic, dlq_topic=dlq, backoff_initial_s=0.05, backoff_max_s=0.5)
print("STATS " + json.dumps(stats.as_dict()), flush=True)
"""


def tape_2024(limit: int) -> list[RecordedTrade]:
    """The first ``limit`` trades of the 2024 recording (BTCUSDT and ETHUSDT, no hole in the ids)."""
    return [t for t in load_recorded_trades() if t.time_ms >= RECORDING_2024_MS][:limit]


def streamer_env(k2_home: Path, bootstrap: str, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K2_STREAM_", "K2_GAP_FILL", "K2_BINANCE_"))}
    env.update(K2_HOME=str(k2_home), K2_KAFKA_BOOTSTRAP=bootstrap, **settings)
    return env


def start_streamer(server_url: str, topic: str, env: dict[str, str], log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-c", STREAMER, server_url, topic, dead_letter_topic(topic)]
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)


def kill_at(process: subprocess.Popen, produced: Callable[[], int], point: int, log_path: Path) -> int:
    """SIGKILL the streamer once ``produced()`` reaches ``point``; returns what was produced then."""
    wait_for(
        lambda: produced() >= point or process.poll() is not None,
        timeout_s=300,
        what=f"the streamer to put {point} trades in Kafka",
        interval_s=0.05,
    )
    assert process.poll() is None, f"the streamer ended before the kill:\n{log_path.read_text()}"
    process.send_signal(signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    return produced()


def topic_trades(kafka: KafkaResource, topic: str) -> list[dict]:
    """Every trade in the topic (decoded), read to its end offsets."""
    ends = kafka.end_offsets(topic)
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in ends]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records: list = []

    def read_to_end() -> bool:
        records.extend(r for batch in consumer.poll(timeout_ms=500).values() for r in batch)
        return all(consumer.position(tp) >= ends[tp.partition] for tp in partitions)

    wait_for(
        read_to_end,
        timeout_s=120,
        what=f"reading {topic} to its end offsets {ends}",
        interval_s=0,
    )
    consumer.close()
    return [decode_trade(r.value) for r in records]


def twice(keys: list) -> list:
    return [key for key, count in Counter(keys).items() if count > 1]
