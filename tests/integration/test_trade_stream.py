"""Trade subscriptions on real Kafka and Iceberg: history then live, each trade once across
commits that move rows from Kafka to Iceberg under the subscription and across reconnects with
the cursor, over the WebSocket route and in Python."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from k2_resources.api.app import ApiSettings, create_app
from k2_resources.api.keys import KeyFile, KeyStore
from k2_resources.api.routers import stream as stream_module
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support.api_server import serving
from tests.support.producing import PARTITIONS, Produced, produce
from tests.support.recorded import recorded_trades_in_time_order

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

FIRST, SECOND = 1000, 1400  # A = records[:FIRST] before subscribing, B = [FIRST:SECOND], C = the rest


@dataclass
class Lake:
    topic: str
    records: list[dict]
    kafka: KafkaResource
    iceberg: IcebergResource
    produced: list[Produced]

    def produce(self, records: list[dict]) -> None:
        self.produced.append(produce(self.kafka, self.topic, records, record_timestamps=True))

    def commit_to_log_end(self, fraction: float = 1.0) -> dict[int, int]:
        """Commit micro-batches from the committed offsets to ``fraction`` of the way to each log end."""
        done = committed_offsets(self.iceberg.trades(), self.topic)
        ends = self.kafka.end_offsets(self.topic)
        for partition, end in ends.items():
            start = done.get(partition, 0)
            upto = start + int((end - start) * fraction)
            if upto > start:
                run_microbatch(self.kafka, self.iceberg, OffsetRange(self.topic, partition, start, upto))
        return committed_offsets(self.iceberg.trades(), self.topic)

    def expected(self, symbols: set[str], start: datetime) -> set[str]:
        """The source's own answer: every produced trade of ``symbols`` at or after ``start``."""
        return {
            row["message_id"]
            for produced in self.produced
            for row in produced.rows
            if row["symbol"] in symbols and row["timestamp"] >= start
        }


@pytest.fixture
def lake(k2_home, kafka_broker, topic_name) -> Lake:
    """A: 1000 recorded trades in Kafka, the first half of each partition committed to Iceberg."""
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS, config={"retention.ms": "-1"})
    records = recorded_trades_in_time_order(per_symbol=900)
    lake = Lake(topic_name, records, kafka, iceberg, [])
    lake.produce(records[:FIRST])
    lake.commit_to_log_end(0.5)
    assert 0 < sum(committed_offsets(iceberg.trades(), topic_name).values()) < FIRST
    return lake


@contextmanager
def api(lake: Lake, k2_home) -> Iterator[tuple[str, str]]:
    keys = KeyFile(k2_home / "api" / "keys.json")
    key, _ = keys.create("stream-test", ["read:trades"], rate_per_second=100, burst=100)
    settings = ApiSettings(keys_file=str(keys.path), topics=[lake.topic])
    hybrid = HybridQueryResource(topics=[lake.topic], producer_clock_slack_seconds=1)
    app = create_app(settings, hybrid=hybrid, keys=KeyStore(keys.path))
    with serving(app) as base_url:
        yield base_url.replace("http://", "ws://") + "/v1/trades/stream", key


class Received:
    """What one client got: message ids in order, and the last cursor."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.cursor: str | None = None
        self.live = False

    def take(self, socket: ClientConnection, until, timeout_s: float = 30.0) -> None:
        """Read messages until ``until(self)`` holds (fails at the deadline)."""
        deadline = time.monotonic() + timeout_s
        while not until(self):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"stream stalled: {len(self.ids)} ids, live={self.live}"
            message = json.loads(socket.recv(timeout=remaining))
            assert message["type"] != "error", message
            self.cursor = message.get("cursor", self.cursor)
            if message["type"] == "trades":
                assert message["count"] == len(message["data"])
                self.ids += [row["message_id"] for row in message["data"]]
            self.live = self.live or message["type"] == "live" or message.get("phase") == "live"


def test_stream_from_history_into_live_across_commits_and_reconnects(lake, k2_home, monkeypatch):
    monkeypatch.setattr(stream_module, "HISTORY_ROWS_PER_MESSAGE", 40)  # several history messages
    start = lake.records[200]["timestamp"]
    symbols = {"BTCUSDT"}
    got = Received()
    with api(lake, k2_home) as (url, key):
        # 1. Subscribe with the key as a query parameter; leave after two history messages.
        with connect(f"{url}?symbol=BTCUSDT&exchange=BINANCE&start={start.isoformat()}&api_key={key}") as socket:
            got.take(socket, lambda r: len(r.ids) >= 80)
        assert not got.live and got.cursor is not None
        history_cursor = got.cursor
        # 2. A micro-batch commits the rest of A: rows move from Kafka to Iceberg under the subscription.
        lake.commit_to_log_end()
        # 3. Resume with the cursor alone, the key as the first message; then B arrives while subscribed.
        with connect(f"{url}?cursor={history_cursor}") as socket:
            socket.send(json.dumps({"api_key": key}))
            got.take(socket, lambda r: r.live)
            lake.produce(lake.records[FIRST:SECOND])
            lake.commit_to_log_end(0.5)  # half of B committed while it streams
            got.take(socket, lambda r: set(r.ids) >= lake.expected(symbols, start))
        live_cursor = got.cursor
        # 4. C is produced while nobody listens; resume with the live cursor, the key as a header.
        lake.produce(lake.records[SECOND:])
        with connect(f"{url}?cursor={live_cursor}", additional_headers={"X-API-Key": key}) as socket:
            got.take(socket, lambda r: set(r.ids) >= lake.expected(symbols, start))

    expected = lake.expected(symbols, start)
    assert len(expected) > 500 and any(r["symbol"] == "ETHUSDT" for r in lake.records)
    assert set(got.ids) == expected, "a trade is missing or extra"
    assert len(got.ids) == len(set(got.ids)), "a trade was delivered twice"


def test_bad_cursor_other_filters_and_no_key_close_with_the_reason(lake, k2_home):
    with api(lake, k2_home) as (url, key):
        for query, code, words in [
            (f"cursor=k2s1.not-json&api_key={key}", 4400, "cursor is damaged"),
            (f"cursor=abc&api_key={key}", 4400, "drop the cursor"),
            ("symbol=BTCUSDT", 4401, "API key"),
        ]:
            with connect(f"{url}?{query}") as socket:
                if "api_key" not in query:
                    socket.send(json.dumps({"hello": 1}))
                error = json.loads(socket.recv(timeout=30))
                assert error["type"] == "error" and error["status"] == code - 4000, error
                assert words in error["detail"], error
                with pytest.raises(ConnectionClosed) as closed:
                    socket.recv(timeout=30)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == code
                assert closed.value.rcvd.reason and error["detail"].startswith(closed.value.rcvd.reason)

        # A cursor resumed with other filters is refused, naming both.
        with connect(f"{url}?symbol=BTCUSDT&api_key={key}") as socket:
            cursor = json.loads(socket.recv(timeout=30))["cursor"]
        with connect(f"{url}?symbol=ETHUSDT&cursor={cursor}&api_key={key}") as socket:
            error = json.loads(socket.recv(timeout=30))
            assert error["status"] == 400 and "ETHUSDT" in error["detail"] and "BTCUSDT" in error["detail"]


def test_python_subscribe_arrow_batches_resume_from_a_history_cursor_across_a_commit(lake):
    start = lake.records[0]["timestamp"]
    hybrid = HybridQueryResource(topics=[lake.topic], producer_clock_slack_seconds=1)
    first = hybrid.subscribe(["BTCUSDT", "ETHUSDT"], start=start, as_="arrow", batch_rows=100)
    batch = next(first)
    assert batch.schema.field("price").type.id == hybrid.trades_arrow("BTCUSDT").schema.field("price").type.id
    ids = batch.column("message_id").to_pylist()
    cursor = first.cursor
    assert first.phase == "history"
    first.close()
    lake.commit_to_log_end()  # the rest of A moves to Iceberg after the snapshot was pinned
    resumed = hybrid.subscribe(cursor=cursor, as_="polars", idle_timeout_s=2.0)
    for frame in resumed:
        ids += frame["message_id"].to_list()
    hybrid.close()
    expected = lake.expected({"BTCUSDT", "ETHUSDT"}, start)
    assert set(ids) == expected and len(ids) == len(expected)
