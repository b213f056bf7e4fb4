"""Trade V2 records survive a real Kafka round trip through the K2 Avro framing."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from kafka import TopicPartition

from k2_resources.errors import KafkaUnavailableError
from k2_resources.kafka.resource import KafkaResource
from k2_resources.schemas import TradeV2, decode_trade, encode_trade

pytestmark = pytest.mark.integration


def _trades(count: int) -> list[dict]:
    start = datetime(2024, 8, 9, tzinfo=UTC)
    return [
        TradeV2(
            message_id=f"BINANCE-BTCUSDT-{i}",
            trade_id=f"BINANCE-{i}",
            symbol=("BTCUSDT", "ETHUSDT")[i % 2],
            exchange="BINANCE",
            asset_class="crypto",
            timestamp=start + timedelta(microseconds=i * 137),
            price=Decimal("61837.63") + Decimal(i) / Decimal(10**8),
            quantity=Decimal("0.00012345"),
            currency="USDT",
            side=("BUY", "SELL")[i % 2],
            trade_conditions=["continuous"] if i % 3 else [],
            source_sequence=i,
            ingestion_timestamp=start,
            vendor_data={"is_best_match": "true"} if i % 5 == 0 else None,
        ).to_record()
        for i in range(count)
    ]


def test_ten_thousand_trades_round_trip_equal(kafka_broker, topic_name):
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    kafka.ensure_topic(topic_name, partitions=3)
    records = _trades(10_000)

    producer = kafka.producer()
    for record in records:
        producer.send(topic_name, key=record["symbol"].encode(), value=encode_trade(record))
    producer.flush()
    producer.close()

    assert sum(kafka.end_offsets(topic_name).values()) == 10_000

    consumer = kafka.consumer()
    partitions = [TopicPartition(topic_name, p) for p in range(3)]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    received: list[dict] = []
    deadline = time.monotonic() + 60
    while len(received) < len(records) and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=1000).values():
            received.extend(decode_trade(message.value) for message in batch)
    consumer.close()

    by_id = {record["message_id"]: record for record in received}
    assert len(received) == len(records) == len(by_id)
    for record in records:
        assert by_id[record["message_id"]] == record


def test_unreachable_broker_gives_one_clear_error():
    port = 1  # nothing listens on port 1 of the loopback
    with pytest.raises(KafkaUnavailableError, match="k2 kafka start"):
        KafkaResource(bootstrap_servers=f"127.0.0.1:{port}", request_timeout_ms=2000).admin()
