"""The benchmark trade message: the plain-dict record is what TradeV2 validates to, and both
encodings carry the same values."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from k2_resources.schemas import TradeV2, decode_trade
from tests.support.trade_messages import avro_message, benchmark_trade, json_message

BASE = datetime(2024, 8, 9, tzinfo=UTC)


def test_plain_record_equals_the_validated_model():
    for index in (0, 1, 2, 999, 1000, 123_457):
        record = benchmark_trade(index, BASE + timedelta(milliseconds=index))
        assert TradeV2(**record).to_record() == record


def test_avro_and_json_carry_the_same_trade():
    record = benchmark_trade(7, BASE + timedelta(microseconds=1_234_567))
    assert decode_trade(avro_message(record)) == record
    plain = json.loads(json_message(record))
    assert plain["price"] == "61837.70000000" and plain["quantity"] == "0.00120000"
    # ISO local date-time with microseconds and "Z": the form the Iceberg sink's converter parses.
    assert plain["timestamp"] == "2024-08-09T00:00:01.234567Z"
    assert Decimal(plain["price"]) == record["price"]
    assert {k: v for k, v in plain.items() if k not in ("price", "quantity", "timestamp", "ingestion_timestamp")} == {
        k: v for k, v in record.items() if k not in ("price", "quantity", "timestamp", "ingestion_timestamp")
    }
