"""Small topics of synthetic trades with chosen symbols, and what Kafka retention does to them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from kafka import TopicPartition

from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from tests.support.producing import Produced, produce
from tests.support.trade_messages import benchmark_trade

BASE_TIME = datetime(2024, 8, 9, 12, 0, tzinfo=UTC)


def trades_of(symbols: list[str], first_index: int = 0) -> list[dict]:
    """One trade per entry of ``symbols`` (in that order), unique message and trade ids from ``first_index``."""
    return [
        benchmark_trade(first_index + i, BASE_TIME + timedelta(milliseconds=first_index + i), symbol)
        for i, symbol in enumerate(symbols)
    ]


def produce_trades(kafka: KafkaResource, topic: str, symbols: list[str], first_index: int = 0, partitions: int = 1):
    """Produce a trade per symbol of ``symbols`` round robin over ``partitions``; where each landed."""
    return produce(kafka, topic, trades_of(symbols, first_index), partitions=partitions)


def delete_records_below(kafka: KafkaResource, topic: str, partition: int, offset: int) -> None:
    """What retention does to a partition: every record below ``offset`` is gone; the log starts there."""
    admin = kafka.admin()
    try:
        admin.delete_records({TopicPartition(topic, partition): offset})
    finally:
        admin.close()
    starts, _ = kafka.offset_bounds(topic)
    assert starts[partition] == offset, f"the log of {topic}/{partition} starts at {starts[partition]}, not {offset}"


def message_ids(iceberg: IcebergResource) -> list[str]:
    """Every message_id in market.trades (repeats kept, so a duplicate shows)."""
    return iceberg.trades().scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist()


def ids_where(produced: Produced, keep) -> set[str]:
    """message_ids of the produced rows ``keep(row)`` selects (a row has partition and offset)."""
    return {row["message_id"] for row in produced.rows if keep(row)}
