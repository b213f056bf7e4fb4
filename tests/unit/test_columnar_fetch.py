"""The column-wise parse of Kafka record batches: the same offsets and values kafka-python gives,
and a clear refusal (so the caller falls back to kafka-python) for anything it does not cover."""

from __future__ import annotations

import struct

import pytest
from kafka.record import MemoryRecords
from kafka.record.default_records import DefaultRecordBatchBuilder

from k2_resources.kafka.columnar_fetch import FastFetchUnavailable, parse_record_batches


def batch(
    base_offset: int, values: list[bytes | None], *, compression: int = 0, keys: bool = True, headers: bool = False
) -> bytes:
    """One v2 record batch as a broker returns it (base offset set, CRC over the rest)."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=compression,
        is_transactional=False,
        producer_id=-1,
        producer_epoch=-1,
        base_sequence=-1,
        batch_size=1 << 20,
    )
    for delta, value in enumerate(values):
        builder.append(
            delta,
            timestamp=1_700_000_000_000 + delta,
            key=b"BTCUSDT" if keys and delta % 2 else None,
            value=value,
            headers=[("h", b"x" * delta)] if headers else [],
        )
    built = bytearray(builder.build())
    struct.pack_into(">q", built, 0, base_offset)
    return bytes(built)


def kafka_python_view(records: bytes) -> list[tuple[int, bytes]]:
    """What kafka-python reads from the same bytes."""
    memory, out = MemoryRecords(records), []
    while (next_batch := memory.next_batch()) is not None:
        out += [(record.offset, record.value) for record in next_batch]
    return out


def test_batches_parse_to_the_offsets_and_values_kafka_python_reads():
    # Values of 1 to 400 bytes: one- and two-byte length varints, keys and headers in between.
    first = [bytes([i]) * (1 + i * 37) for i in range(11)]
    second = [b"v" * n for n in (0, 5, 127, 128, 300)]
    records = batch(0, first, headers=True) + batch(11, second) + batch(16, [b"last"], keys=False)
    offsets, values, next_offset = parse_record_batches(records, 0, 17)
    assert list(zip(offsets.tolist(), values.to_pylist())) == kafka_python_view(records)
    assert next_offset == 17


def test_records_outside_the_range_are_left_out():
    records = batch(0, [b"a", b"b", b"c"]) + batch(3, [b"d", b"e"])
    offsets, values, next_offset = parse_record_batches(records, 1, 4)  # a fetch at 1 returns the batch from 0
    assert offsets.tolist() == [1, 2, 3]
    assert values.to_pylist() == [b"b", b"c", b"d"]
    assert next_offset == 4


def test_a_batch_cut_off_at_the_end_of_the_response_is_left_for_the_next_fetch():
    records = batch(0, [b"a", b"b"]) + batch(2, [b"c", b"d"])
    offsets, values, next_offset = parse_record_batches(records[:-3], 0, 10)
    assert offsets.tolist() == [0, 1]
    assert next_offset == 2


@pytest.mark.parametrize(
    "records, reason",
    [
        (batch(0, [b"a" * 1000] * 5, compression=1), "compressed"),  # gzip
        (batch(0, [b"a", None]), "null value"),
        (batch(0, [b"a"]) + batch(5, [b"b"]), "contiguously"),  # offsets skip (compaction)
    ],
    ids=["compressed", "null-value", "offsets-skip"],
)
def test_what_the_column_wise_parse_does_not_cover_is_refused_with_the_reason(records, reason):
    with pytest.raises(FastFetchUnavailable, match=reason):
        parse_record_batches(records, 0, 10)


def test_a_corrupt_batch_fails_its_crc_check():
    records = bytearray(batch(0, [b"abc", b"def"]))
    records[-2] ^= 0xFF
    with pytest.raises(FastFetchUnavailable, match="CRC"):
        parse_record_batches(bytes(records), 0, 2)
