"""The benchmark trade message, as K2's Avro and as the plain JSON a Kafka Connect sink reads.

Both encodings carry the same trade: the one bench_stream produces (a Binance trade with the
vendor fields normalise_trade keeps). The JSON form is for the Iceberg Kafka Connect sink, which
has no converter for K2's framed Avro without a schema registry: field names are the Iceberg
columns, decimals are strings with 8 places, times are ISO-8601 UTC with microseconds and a "Z".
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from k2_resources.kafka.resource import KafkaResource
from k2_resources.schemas import encode_trade

SYMBOLS = ("BTCUSDT", "ETHUSDT", "BNBUSDT")
PARTITIONS = 3


def benchmark_trade(index: int, event_time: datetime, symbol: str | None = None) -> dict[str, Any]:
    """Trade ``index`` of a benchmark topic as a TradeV2 record (Python values).

    Built as a plain dict, the shape ``TradeV2(...).to_record()`` gives (a unit test holds them
    equal): validating 200K models would double the time it takes to fill a topic.
    """
    symbol = symbol or SYMBOLS[index % len(SYMBOLS)]
    event_ms = int(event_time.timestamp() * 1000)
    return {
        "message_id": f"BINANCE-{symbol}-{index}",
        "symbol": symbol,
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": event_time,
        "currency": "USDT",
        "source_sequence": index,
        "ingestion_timestamp": event_time,
        "platform_sequence": None,
        # What normalise_trade keeps of a live Binance trade message.
        "vendor_data": {
            "E": str(event_ms),
            "b": str(20720542158 + index),
            "a": str(20720542592 + index),
            "m": "true" if index % 2 else "false",
            "M": "true",
            "stream": f"{symbol.lower()}@trade",
        },
        "trade_id": f"BINANCE-{index}",
        "price": Decimal("61837.63") + Decimal(index % 1000) / 100,
        "quantity": Decimal("0.00120000"),
        "side": ("BUY", "SELL")[index % 2],
        "trade_conditions": [],
    }


def avro_message(record: dict[str, Any]) -> bytes:
    """What K2's sink consumes: the framed Avro TradeV2 message."""
    return encode_trade(record)


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"{value:.8f}"
    if isinstance(value, datetime):
        # The sink parses ISO local date-time then "Z" or "+HHmm"; "+00:00" is refused.
        return value.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    return value


def json_message(record: dict[str, Any]) -> bytes:
    """What the Kafka Connect sink consumes (JsonConverter, schemas.enable=false): the same trade."""
    return json.dumps({key: _json_value(value) for key, value in record.items()}, separators=(",", ":")).encode()


def produce_benchmark_topic(kafka: KafkaResource, topic: str, count: int, encoding: str) -> int:
    """Fill ``topic`` with trades 0..count-1 (trade i to partition i % 3, 1 ms apart from
    2024-08-09), as ``avro`` or ``json``; the bytes of the values sent."""
    encode = {"avro": avro_message, "json": json_message}[encoding]
    producer = kafka.producer()
    base = datetime(2024, 8, 9, tzinfo=UTC)
    sent = 0
    for index in range(count):
        value = encode(benchmark_trade(index, base + timedelta(milliseconds=index)))
        sent += len(value)
        producer.send(topic, value=value, partition=index % PARTITIONS)
    producer.flush()
    producer.close()
    return sent


if __name__ == "__main__":
    # python -m tests.support.trade_messages TOPIC COUNT ENCODING: fill a topic from a process of its
    # own (a benchmark fills its two topics at once); prints the bytes sent.
    print(produce_benchmark_topic(KafkaResource(), sys.argv[1], int(sys.argv[2]), sys.argv[3]), flush=True)
