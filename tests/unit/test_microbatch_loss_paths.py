"""The micro-batch reader without a broker: retention deleting offsets mid-read is recorded, a
compacted-style offset jump is not, and a record that decodes but cannot be stored is screened out."""

from __future__ import annotations

from collections import namedtuple
from datetime import UTC, datetime
from decimal import Decimal

import pyarrow as pa
import pytest

from k2_resources.schemas import encode_trade
from k2_resources.sink.errors import RetentionLossError
from k2_resources.sink.offsets import OffsetRange
from k2_resources.sink.range_read import decode_raw, read_range, read_raw_range

Message = namedtuple("Message", "offset value key timestamp")
TOPIC = "market.trades.binance"


def trade(sequence: int, price: str = "64000.5") -> dict:
    moment = datetime(2024, 8, 9, 0, 0, sequence % 60, tzinfo=UTC)
    return {
        "message_id": f"m{sequence}",
        "trade_id": f"BINANCE-{sequence}",
        "symbol": "BTCUSDT",
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": moment,
        "price": Decimal(price),
        "quantity": Decimal("0.01"),
        "currency": "USDT",
        "side": "BUY",
        "trade_conditions": [],
        "source_sequence": sequence,
        "ingestion_timestamp": moment,
        "platform_sequence": None,
        "vendor_data": None,
    }


class FakeConsumer:
    """Serves ``messages`` in polls of three; ``log_starts`` are returned by successive beginning_offsets calls."""

    def __init__(self, messages: list[Message], log_starts: list[int]) -> None:
        self.messages, self.log_starts, self.position_ = messages, list(log_starts), 0

    def assign(self, partitions):
        self.partition = partitions[0]

    def beginning_offsets(self, partitions):
        start = self.log_starts.pop(0) if len(self.log_starts) > 1 else self.log_starts[0]
        return {partitions[0]: start}

    def seek(self, partition, offset):
        self.position_ = offset

    def poll(self, timeout_ms):
        batch = [m for m in self.messages if m.offset >= self.position_][:3]
        if batch:
            self.position_ = batch[-1].offset + 1
        return {self.partition: batch}

    def position(self, partition):
        return self.position_

    def close(self):
        pass


class FakeKafka:
    servers = "fake:9092"

    def __init__(self, consumer: FakeConsumer) -> None:
        self._consumer = consumer

    def consumer(self, group_id=None):
        return self._consumer


def messages(offsets) -> list[Message]:
    return [Message(o, encode_trade(trade(o)), b"BTCUSDT", 0) for o in offsets]


def test_offsets_deleted_while_the_batch_reads_are_recorded_as_lost():
    # Offsets 0..4 are read; retention then deletes up to 10 and the consumer resumes at the log start.
    consumer = FakeConsumer(messages([*range(0, 5), *range(10, 15)]), log_starts=[0, 10])
    read = read_range(FakeKafka(consumer), OffsetRange(TOPIC, 0, 0, 15))
    assert read.lost == [(5, 10)]
    assert [r["platform_sequence"] for r in read.records] == [*range(0, 5), *range(10, 15)]


def test_a_log_start_above_the_batch_start_is_lost_before_reading_and_the_rest_is_read():
    consumer = FakeConsumer(messages(range(8, 12)), log_starts=[8])
    read = read_range(FakeKafka(consumer), OffsetRange(TOPIC, 0, 3, 12))
    assert read.lost == [(3, 8)] and len(read.records) == 4


def test_an_offset_jump_with_the_log_start_below_it_is_not_a_loss():
    # Compacted topics and transaction markers skip offsets; the log start tells them apart from retention.
    consumer = FakeConsumer(messages([0, 1, 5, 6]), log_starts=[0])
    read = read_range(FakeKafka(consumer), OffsetRange(TOPIC, 0, 0, 7))
    assert read.lost == [] and len(read.records) == 4


def test_without_a_place_to_record_it_a_loss_is_an_error_naming_the_range():
    consumer = FakeConsumer(messages(range(8, 12)), log_starts=[8])
    with pytest.raises(RetentionLossError, match=r"offsets \[3, 8\) .* deleted by Kafka retention"):
        read_raw_range(FakeKafka(consumer), OffsetRange(TOPIC, 0, 3, 12))


def test_a_record_that_decodes_but_cannot_be_stored_becomes_a_dead_letter_with_its_bytes_and_reason():
    values = [
        encode_trade(trade(0)),
        encode_trade(trade(1, price="123456789012345.5")),
        encode_trade(trade(2)),
        b"\x00\x00\x00\x00\x01\xff",
    ]
    raw = pa.table({"offset": [10, 11, 12, 13], "timestamp_ms": [0] * 4, "key": [b"k"] * 4, "value": values})
    read = decode_raw(raw)
    assert [r["platform_sequence"] for r in read.records] == [10, 12]
    assert read.raw_values == [values[0], values[2]]
    assert [(offset, value) for offset, value, _ in read.dead_letters] == [(11, values[1]), (13, values[3])]
    assert read.dead_letters[0][2].startswith("unstorable in market.trades: ")
    assert read.dead_letters[1][2].startswith("undecodable: ")
