"""The column-wise micro-batch path gives exactly what the record-by-record path gives.

The sink decodes a batch of Kafka messages into Arrow columns at once
(k2_resources/schemas/columnar.py) and enriches, splits and checks it column-wise
(k2_resources/sink/decode.py, enrich.py, gaps_and_shedding.py).
The record-by-record definitions (fastavro ``decode_trade``, ``to_arrow``, ``enrich``,
``sequence_gaps``, ``LoadShedder.split``) are the reference: these tests compare the two on
randomised records, including the awkward values (negative and extreme decimals, int64 limits,
non-ASCII text, empty and null maps, a k2.* key already present) and malformed messages.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pyarrow as pa

from k2_resources.catalog.resource import to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.degradation.shedding import LoadShedder
from k2_resources.schemas import TRADE_V2, decode_trade, encode_trade
from k2_resources.schemas.avro import TRADE_V2_SCHEMA_ID
from k2_resources.schemas.columnar import decode_columnar
from k2_resources.sink.decode import decode_batch, rows_to_records
from k2_resources.sink.enrich import enrich, enrich_rows
from k2_resources.sink.gaps_and_shedding import sequence_gaps, sequence_gaps_of, split_rows

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def random_trade(rng: random.Random, index: int) -> dict:
    scale = Decimal(10) ** 8
    return {
        "message_id": f"BINANCE-{index}-{rng.choice(['', 'é', '漢字', '🙂'])}",
        "trade_id": f"BINANCE-{index}",
        "symbol": rng.choice(["BTCUSDT", "ETHUSDT", "BNBUSDT", "PEPEUSDT", "BHP"]),
        "exchange": rng.choice(["BINANCE", "ASX"]),
        "asset_class": rng.choice(["equities", "crypto", "futures", "options"]),
        "timestamp": EPOCH + timedelta(microseconds=rng.randrange(-(10**16), 10**17)),
        "price": Decimal(
            rng.choice(
                [1, -1, 127, 128, -128, -129, 255, 256, 10**18 - 1, -(10**18 - 1), rng.randrange(-(10**17), 10**17)]
            )
        )
        / scale,
        "quantity": Decimal(rng.randrange(0, 10**12)) / scale,
        "currency": rng.choice(["USDT", "AUD", ""]),
        "side": rng.choice(["BUY", "SELL", "SELL_SHORT", "UNKNOWN"]),
        "trade_conditions": [f"c{j}" for j in range(rng.choice([0, 0, 1, 3]))],
        "source_sequence": rng.choice([None, 0, -1, 2**63 - 1, -(2**63), rng.randrange(10**12)]),
        "ingestion_timestamp": EPOCH + timedelta(microseconds=rng.randrange(0, 2 * 10**15)),
        "platform_sequence": rng.choice([None, 7]),
        "vendor_data": rng.choice(
            [None, {}, {"E": str(index), "m": "true", "stream": "btcusdt@trade", "ü": "ß"}, {"k2.tier": "9", "x": ""}]
        ),
    }


def reference_rows(values: list[bytes | None], offsets: list[int]) -> pa.Table:
    """The record-by-record path: fastavro, the offset as platform_sequence, to_arrow."""
    records = []
    for offset, value in zip(offsets, values):
        record = decode_trade(value)
        record["platform_sequence"] = offset
        records.append(record)
    return to_arrow(records, TRADES)


def test_a_batch_decodes_to_exactly_what_fastavro_and_to_arrow_give():
    rng = random.Random(12)
    values: list[bytes | None] = [encode_trade(random_trade(rng, i)) for i in range(3000)]
    valid = values[5]
    malformed = {
        3: b"\x00\x00\x00\x00\x01\xff",  # truncated Avro
        9: None,  # a tombstone
        11: b"\x00\x00\x00\x00\x02" + valid[5:],  # another schema id
        13: encode_trade({**random_trade(rng, 13), "price": Decimal("123456789012345.5")}),  # beyond decimal(18,8)
        15: valid[:-3],  # cut short
        17: b"",
        19: valid + b"tail",  # bytes left over: decoded one by one (fastavro accepts them)
        21: encode_trade({**random_trade(rng, 21), "message_id": "BINANCE-~"}).replace(b"BINANCE-~", b"BINANCE-\xff"),
        23: encode_trade({**random_trade(rng, 23), "vendor_data": {"k": "~~"}}).replace(b"~~", b"\xc3\x28"),
    }
    for position, value in malformed.items():
        values[position] = value
    offsets = list(range(500, 500 + len(values)))

    batch = decode_columnar(
        values,
        TRADE_V2,
        TRADE_V2_SCHEMA_ID,
        TRADES.arrow_schema(),
        {"platform_sequence": pa.array(offsets, pa.int64())},
    )

    assert batch.irregular.tolist() == sorted(malformed)
    regular = [i for i in range(len(values)) if i not in malformed]
    assert batch.rows.tolist() == regular
    assert batch.table.equals(reference_rows([values[i] for i in regular], [offsets[i] for i in regular]))


def test_decode_batch_keeps_the_dead_letter_reasons_and_offset_order_of_the_record_path():
    rng = random.Random(3)
    good = [encode_trade(random_trade(rng, i)) for i in range(6)]
    trailing = good[4] + b"xx"  # irregular for the column path, fine for fastavro: stored, in its place
    poison_price = encode_trade({**random_trade(rng, 99), "price": Decimal("123456789012345.5")})
    values = [good[0], b"\x00\x00\x00\x00\x01 not avro", good[1], poison_price, trailing, good[5]]
    offsets = [40, 41, 42, 43, 44, 45]

    read = decode_batch(offsets, values)

    assert read.rows.column("platform_sequence").to_pylist() == [40, 42, 44, 45]
    assert read.raw_values == [values[0], values[2], values[4], values[5]]
    assert read.rows.equals(reference_rows([values[0], values[2], values[4], values[5]], [40, 42, 44, 45]))
    assert [(offset, raw) for offset, raw, _ in read.dead_letters] == [(41, values[1]), (43, values[3])]
    assert read.dead_letters[0][2].startswith("undecodable: ")
    assert read.dead_letters[1][2].startswith("unstorable in market.trades: ")
    assert read.last_offset_seen == 45
    assert [r["platform_sequence"] for r in read.records] == [40, 42, 44, 45]


def test_column_wise_enrichment_equals_the_per_record_definition():
    rng = random.Random(5)
    records = [random_trade(rng, i) for i in range(2000)]
    # Tiny notionals that Arrow would print in scientific notation, and zero.
    records[0].update(price=Decimal("0.00000001"), quantity=Decimal("0.00000001"))
    records[1].update(price=Decimal("0E-8"), quantity=Decimal("5.00000000"))
    records[2].update(price=Decimal("100.00000000"), quantity=Decimal("3.00000000"))
    for record in records:
        record["quantity"] = abs(record["quantity"])
        # Keep products within Decimal's default 28 significant digits, where both are exact.
        record["price"] = record["price"] % Decimal(10**6)
    shedder = LoadShedder()
    rows = to_arrow(records, TRADES)

    enriched = rows_to_records(enrich_rows(rows, shedder))
    expected = [dict(r) for r in records]
    enrich(expected, shedder)

    assert [r["vendor_data"] for r in enriched] == [r["vendor_data"] for r in expected]
    assert enriched[0]["vendor_data"]["k2.notional"] == "0.0000000000000001"
    assert enriched[1]["vendor_data"]["k2.notional"] == "0"
    assert enriched[2]["vendor_data"]["k2.notional"] == "300"


def test_column_wise_gaps_and_shedding_equal_the_per_record_definitions():
    rng = random.Random(8)
    records = [random_trade(rng, i) for i in range(3000)]
    for record in records:
        if record["source_sequence"] is not None:
            record["source_sequence"] = rng.randrange(0, 5000)
    rows = to_arrow(records, TRADES)
    assert sequence_gaps_of(rows) == sequence_gaps(records)
    assert sequence_gaps_of(to_arrow([], TRADES)) == {}

    shedder = LoadShedder()
    for level in (0, 1, 2):
        kept, deferred_by_symbol = split_rows(rows, shedder, level)
        kept_records, deferred_records = shedder.split(records, level)
        assert kept.column("message_id").to_pylist() == [r["message_id"] for r in kept_records]
        counts: dict[str, int] = {}
        for record in deferred_records:
            counts[record["symbol"]] = counts.get(record["symbol"], 0) + 1
        assert deferred_by_symbol == counts
