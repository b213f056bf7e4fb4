"""Subscription benchmark: 50 WebSocket subscribers of `k2 api` while a producer writes trades;
writes the ``subscribe`` key of bench-results/api.json (merged: the other keys stay).

Data: 100K synthetic BTCUSDT/ETHUSDT trades (tests/support/synthetic.py) ending now in Iceberg, and
5K more in a real Kafka topic above the committed offsets. The server is the real command (`python
-m k2_assets.cli api`, one uvicorn process) in a subprocess; the subscribers are one asyncio
process with 50 WebSocket connections to ``/v1/trades/stream`` from ``start`` = a moment before the
producer begins (so every trade they must see is one it writes); the producer begins once every
subscriber is live. While they listen:

- a producer thread writes ``RATE`` new trades a second for ``DURATION_S`` in chunks of a tenth of a
  second, each message's Kafka timestamp the wall-clock time it was sent;
- a committer thread runs a micro-batch of everything above the committed offsets every second
  (as the follower does), so rows move from Kafka to Iceberg under the subscriptions;
- halfway, every subscriber is disconnected and reconnects with the last cursor it received.

Figures: each trade's time from its Kafka timestamp to each subscriber receiving it (p50, p99 over
every (trade, subscriber) pair, except trades sent while that subscriber was away, which are
reported separately), and whether every subscriber received every produced trade exactly once
(``missing`` and ``duplicates`` summed over subscribers; ``exact_across_reconnect`` true when both
are 0). Timing is reported, not asserted: tests/benchmarks/targets.toml holds the targets.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime

import pytest
from websockets.asyncio.client import connect

from k2_resources.api.keys import KeyFile
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.platform.kafka_broker import free_port
from k2_resources.schemas import encode_trade
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from tests.support import synthetic
from tests.support.api_server import wait_until_serving
from tests.support.bench_results import merge_bench_json

SUBSCRIBERS = 50
RATE = 100  # trades a second
DURATION_S = 20.0
ICEBERG_ROWS = 100_000
KAFKA_ROWS = 5_000
PARTITIONS = 3

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def build(kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> list[dict]:
    """History in Iceberg and a tail in Kafka; returns record templates for the live trades."""
    trades = synthetic.binance_trades(ICEBERG_ROWS + KAFKA_ROWS, datetime.now(UTC))
    synthetic.append_in_chunks(iceberg.trades(), synthetic.to_trades_arrow(trades.head(ICEBERG_ROWS)), 50_000)
    kafka.ensure_topic(topic, partitions=PARTITIONS)
    producer = kafka.producer()
    for index, record in enumerate(synthetic.to_records(trades.tail(KAFKA_ROWS))):
        producer.send(topic, key=record["symbol"].encode(), value=encode_trade(record), partition=index % PARTITIONS)
    producer.flush()
    producer.close()
    for partition in range(PARTITIONS):
        run_microbatch(kafka, iceberg, OffsetRange(topic, partition, 0, KAFKA_ROWS // PARTITIONS // 2))
    return synthetic.to_records(trades.tail(1_000))


class Producer(threading.Thread):
    """Writes RATE trades a second (Kafka timestamp = send time) and keeps each one's send time."""

    def __init__(self, kafka: KafkaResource, topic: str, templates: list[dict]) -> None:
        super().__init__(name="bench-producer", daemon=True)
        self.kafka, self.topic, self.templates = kafka, topic, templates
        self.sent_ms: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = self.kafka.producer()
            chunk = max(1, RATE // 10)
            began = time.monotonic()
            count = 0
            while count < RATE * DURATION_S:
                for _ in range(chunk):
                    template = self.templates[count % len(self.templates)]
                    now = datetime.now(UTC)
                    sent_ms = int(now.timestamp() * 1000)
                    record = {**template, "message_id": f"BENCH-{count}", "timestamp": now, "ingestion_timestamp": now}
                    producer.send(
                        self.topic, key=record["symbol"].encode(), value=encode_trade(record), timestamp_ms=sent_ms
                    )
                    self.sent_ms[record["message_id"]] = sent_ms
                    count += 1
                producer.flush()
                next_at = began + count / RATE
                time.sleep(max(0.0, next_at - time.monotonic()))  # pacing the load, not waiting on a condition
            producer.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


class Committer(threading.Thread):
    """A micro-batch of everything above the committed offsets every second, as the follower does."""

    def __init__(self, kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> None:
        super().__init__(name="bench-committer", daemon=True)
        self.kafka, self.iceberg, self.topic = kafka, iceberg, topic
        self.stop = threading.Event()
        self.commits = 0

    def run(self) -> None:
        while not self.stop.wait(1.0):
            done = committed_offsets(self.iceberg.trades(), self.topic)
            for partition, end in self.kafka.end_offsets(self.topic).items():
                if end > done.get(partition, 0):
                    run_microbatch(
                        self.kafka, self.iceberg, OffsetRange(self.topic, partition, done.get(partition, 0), end)
                    )
                    self.commits += 1


class Subscriber:
    """One WebSocket client: what it received and when, and its last cursor."""

    def __init__(self) -> None:
        self.received: list[tuple[str, float]] = []  # (message_id, wall-clock ms)
        self.cursor: str | None = None
        self.away: tuple[float, float] | None = None  # wall-clock ms of the forced disconnect, reconnect
        self.live = asyncio.Event()  # the server said the subscription reached the live phase

    async def listen(self, url: str, stop: asyncio.Event) -> None:
        async with connect(url, max_size=None) as socket:
            while not stop.is_set():
                try:
                    text = await asyncio.wait_for(socket.recv(), 0.5)
                except TimeoutError:
                    continue
                now_ms = time.time() * 1000
                message = json.loads(text)
                if message["type"] == "error":
                    raise AssertionError(message)
                self.cursor = message.get("cursor", self.cursor)
                if message["type"] == "live" or message.get("phase") == "live":
                    self.live.set()
                if message["type"] == "trades":
                    self.received += [(row["message_id"], now_ms) for row in message["data"]]


async def _run(base: str, key: str, start: datetime, producer: Producer) -> list[Subscriber]:
    subscribers = [Subscriber() for _ in range(SUBSCRIBERS)]
    url = f"{base}?start={start.isoformat().replace('+00:00', 'Z')}&api_key={key}"
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.listen(url, stop)) for s in subscribers]
    # The producer starts once every subscriber is live: its trades measure delivery, not 50
    # subscriptions opening at once (the reconnect below measures that, reported on its own).
    await asyncio.wait_for(asyncio.gather(*(s.live.wait() for s in subscribers)), 120)
    producer.start()
    await asyncio.sleep(DURATION_S / 2)  # halfway through the producer's run
    away_from = time.time() * 1000
    stop.set()
    await asyncio.gather(*tasks)  # every subscriber disconnects...
    stop = asyncio.Event()
    tasks = [asyncio.create_task(s.listen(f"{base}?cursor={s.cursor}&api_key={key}", stop)) for s in subscribers]
    for subscriber in subscribers:
        subscriber.away = (away_from, time.time() * 1000)
    deadline = time.monotonic() + DURATION_S + 60
    while time.monotonic() < deadline:  # until each has every produced trade (or the deadline)
        if not producer.is_alive() and all(
            len({m for m, _ in s.received}) >= len(producer.sent_ms) for s in subscribers
        ):
            break
        await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    return subscribers


def _figures(subscribers: list[Subscriber], sent_ms: dict[str, int]) -> dict:
    latencies: list[float] = []
    during_reconnect: list[float] = []
    first_sent = min(sent_ms.values(), default=0)
    by_second: dict[int, list[float]] = {}  # steady-state latencies by the second of the run they were sent in
    missing = duplicates = 0
    for subscriber in subscribers:
        ids = [m for m, _ in subscriber.received]
        missing += len(set(sent_ms) - set(ids))
        duplicates += len(ids) - len(set(ids)) + len(set(ids) - set(sent_ms))
        away = subscriber.away or (0.0, 0.0)
        for message_id, at_ms in subscriber.received:
            sent = sent_ms.get(message_id)
            if sent is None:
                continue
            if away[0] - 1000 <= sent <= away[1] + 500:
                during_reconnect.append(at_ms - sent)
            else:
                latencies.append(at_ms - sent)
                by_second.setdefault(int((sent - first_sent) // 1000), []).append(at_ms - sent)
    return {
        "p50_ms": round(percentile(latencies, 50), 1),
        "p99_ms": round(percentile(latencies, 99), 1),
        "max_ms": round(max(latencies), 1),
        "p99_ms_sent_around_the_reconnect": round(percentile(during_reconnect, 99), 1) if during_reconnect else None,
        "p99_ms_by_second_sent": {second: round(percentile(v, 99), 1) for second, v in sorted(by_second.items())},
        "deliveries": len(latencies) + len(during_reconnect),
        "missing": missing,
        "duplicates": duplicates,
        "exact_across_reconnect": missing == 0 and duplicates == 0,
    }


def test_subscribe_latency_and_exactness_at_50_subscribers(k2_home, kafka_broker, topic_name, tmp_path):
    kafka, iceberg = KafkaResource(), IcebergResource()
    templates = build(kafka, iceberg, topic_name)
    keys = KeyFile(k2_home / "api" / "keys.json")
    key, _ = keys.create("benchmark", ["read:trades"], rate_per_second=1_000, burst=1_000)
    env = dict(
        os.environ,
        K2_HOME=str(k2_home),
        K2_API_TOPICS=topic_name,
        K2_API_KEYS_FILE=str(keys.path),
        K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers,
        PYTHONFAULTHANDLER="1",
    )
    port = free_port()
    with (tmp_path / "api.log").open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "k2_assets.cli", "api", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        committer = Committer(kafka, iceberg, topic_name)
        try:
            wait_until_serving(f"http://127.0.0.1:{port}", process=server)
            producer = Producer(kafka, topic_name, templates)
            committer.start()
            start = datetime.now(UTC)
            subscribers = asyncio.run(_run(f"ws://127.0.0.1:{port}/v1/trades/stream", key, start, producer))
        finally:
            committer.stop.set()
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # stuck: its threads' stacks go to the log (faulthandler)
                server.send_signal(signal.SIGABRT)
                server.wait(timeout=30)
        committer.join(timeout=60)
    assert producer.error is None, producer.error
    figures = _figures(subscribers, producer.sent_ms)
    result = {
        **figures,
        "subscribers": SUBSCRIBERS,
        "trades": len(producer.sent_ms),
        "rate_per_s": RATE,
        "duration_s": DURATION_S,
        "commits_during_run": committer.commits,
        "load_average_1m_after": round(os.getloadavg()[0], 2),
    }
    merge_bench_json("api.json", {"subscribe": result})
    print(json.dumps({"subscribe": result}, indent=2))
