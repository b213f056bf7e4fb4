"""On a real broker, the column-wise fetch reads exactly what kafka-python reads, and a range it
does not cover (a compressed topic) is still read exactly, through kafka-python."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from k2_resources.kafka.columnar_fetch import FastFetchUnavailable, fetch_range
from k2_resources.kafka.resource import KafkaResource
from k2_resources.schemas import encode_trade
from k2_resources.sink.decode import decode_batch
from k2_resources.sink.offsets import OffsetRange
from k2_resources.sink.range_read import read_range, read_raw_range

MESSAGES = 3_000


def trade(sequence: int) -> dict:
    moment = datetime(2024, 8, 9, tzinfo=UTC) + timedelta(milliseconds=sequence)
    return {
        "message_id": f"m{sequence}",
        "trade_id": f"BINANCE-{sequence}",
        "symbol": ("BTCUSDT", "ETHUSDT")[sequence % 2],
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": moment,
        "price": Decimal("64000.5") + Decimal(sequence) / 100,
        "quantity": Decimal("0.01"),
        "currency": "USDT",
        "side": "BUY",
        "trade_conditions": [],
        "source_sequence": sequence,
        "ingestion_timestamp": moment,
        "platform_sequence": None,
        "vendor_data": {"E": str(sequence), "m": "true"},
    }


def fill(kafka: KafkaResource, topic: str, **producer_config) -> None:
    kafka.ensure_topic(topic, partitions=1)
    producer = kafka.producer(**producer_config)
    for sequence in range(MESSAGES):
        producer.send(topic, key=b"BTCUSDT", value=encode_trade(trade(sequence)), partition=0)
    producer.flush()
    producer.close()


def kafka_python_read(kafka: KafkaResource, batch: OffsetRange):
    raw = read_raw_range(kafka, batch)  # kafka-python's poll loop
    return decode_batch(raw.column("offset").to_pylist(), raw.column("value").to_pylist())


@pytest.mark.timeout(300)
def test_the_column_wise_fetch_reads_what_kafka_python_reads(kafka_broker, topic_name):
    kafka = KafkaResource()
    fill(kafka, topic_name)
    for batch in (OffsetRange(topic_name, 0, 0, MESSAGES), OffsetRange(topic_name, 0, 1_001, 2_002)):
        offsets, values = fetch_range(kafka.servers, "k2-test", batch.topic, batch.partition, batch.start, batch.end)
        assert offsets.to_pylist() == list(range(batch.start, batch.end))
        fast, exact = read_range(kafka, batch), kafka_python_read(kafka, batch)
        assert fast.rows.equals(exact.rows)
        assert fast.raw_values == exact.raw_values == values.to_pylist()
        assert fast.dead_letters == exact.dead_letters == []


@pytest.mark.timeout(300)
def test_a_compressed_topic_is_read_exactly_through_kafka_python(kafka_broker, topic_name):
    kafka = KafkaResource()
    fill(kafka, topic_name, compression_type="gzip")
    batch = OffsetRange(topic_name, 0, 0, MESSAGES)
    with pytest.raises(FastFetchUnavailable, match="compressed"):
        fetch_range(kafka.servers, "k2-test", batch.topic, batch.partition, batch.start, batch.end)
    read = read_range(kafka, batch)
    assert read.rows.column("platform_sequence").to_pylist() == list(range(MESSAGES))
    assert read.rows.equals(kafka_python_read(kafka, batch).rows)
