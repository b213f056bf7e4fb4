"""Binance trade frames to trade V2: the mapping, exact numbers, and one clear reason per bad frame."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from k2_resources.binance.normalise import MalformedTradeMessage, normalise_trade, quote_asset
from k2_resources.paths import DATA_DIR
from k2_resources.schemas import decode_trade, encode_trade

SAMPLES = [json.loads(line) for line in (DATA_DIR / "binance" / "ws-samples.jsonl").read_text().splitlines()]
INGESTED = datetime(2024, 8, 9, 0, 0, 1, tzinfo=UTC)


def _frame(**changes: object) -> dict:
    message = json.loads(json.dumps(SAMPLES[0]))
    for key, value in changes.items():
        if value is _DROP:
            del message["data"][key]
        else:
            message["data"][key] = value
    return message


_DROP = object()


def test_a_recorded_2023_frame_maps_every_field():
    record = normalise_trade(json.dumps(SAMPLES[0]), ingestion_time=INGESTED)
    assert record == {
        "message_id": "BINANCE-BTCUSDT-3071245454",
        "trade_id": "BINANCE-3071245454",
        "symbol": "BTCUSDT",
        "exchange": "BINANCE",
        "asset_class": "crypto",
        "timestamp": datetime(2023, 4, 4, 23, 59, 59, 999000, tzinfo=UTC),  # T, not E
        "price": Decimal("28165.47000000"),
        "quantity": Decimal("0.00056000"),
        "currency": "USDT",
        "side": "SELL",  # m=true: the buyer was the maker, the seller aggressed
        "trade_conditions": [],
        "source_sequence": 3071245454,
        "ingestion_timestamp": INGESTED,
        "platform_sequence": None,
        "vendor_data": {
            "E": "1680652800000",
            "b": "20720542158",
            "a": "20720542592",
            "m": "true",
            "M": "true",
            "stream": "btcusdt@trade",
        },
    }


def test_every_recorded_sample_normalises_and_round_trips_through_avro():
    for message in SAMPLES:
        record = normalise_trade(json.dumps(message), ingestion_time=INGESTED)
        data = message["data"]
        assert record["side"] == ("SELL" if data["m"] else "BUY")
        assert str(record["price"]) == data["p"] and str(record["quantity"]) == data["q"]
        assert record["vendor_data"]["E"] == str(data["E"])
        assert decode_trade(encode_trade(record)) == record


def test_buyer_not_maker_is_a_buy_and_the_2024_shape_has_no_order_ids():
    message = next(m for m in SAMPLES if m["data"]["m"] is False and "b" not in m["data"])
    record = normalise_trade(message)
    assert record["side"] == "BUY"
    assert set(record["vendor_data"]) == {"E", "m", "M", "stream"}
    assert record["vendor_data"]["m"] == "false"


def test_decimals_are_exact_not_floats():
    record = normalise_trade(_frame(p="0.10000003", q="12345.00000001"))
    assert record["price"] == Decimal("0.10000003") and record["quantity"] == Decimal("12345.00000001")
    assert record["price"] * 3 == Decimal("0.30000009")


def test_a_raw_stream_frame_without_the_combined_envelope_is_accepted():
    record = normalise_trade(SAMPLES[0]["data"])
    assert record["trade_id"] == "BINANCE-3071245454" and "stream" not in record["vendor_data"]


def test_quote_asset_comes_from_the_symbol():
    assert quote_asset("BTCUSDT") == "USDT"
    assert quote_asset("ETHBTC") == "BTC"
    assert quote_asset("BTCFDUSD") == "FDUSD"
    with pytest.raises(MalformedTradeMessage, match="unknown_quote_asset"):
        quote_asset("USDT")


@pytest.mark.parametrize(
    ("frame", "code", "names"),
    [
        ('{"stream":"btcusdt@trade","data":{"e":"tra', "invalid_json", "not valid JSON"),
        ("[1, 2]", "not_an_object", "list"),
        (_frame(p=_DROP), "missing_field", "'p'"),
        (_frame(T=_DROP), "missing_field", "'T'"),
        (_frame(m=_DROP), "missing_field", "'m'"),
        (_frame(p="abc"), "bad_number", "'p'='abc'"),
        (_frame(q="-1.0"), "bad_number", "above 0"),
        (_frame(p="NaN"), "bad_number", "finite"),
        (_frame(p=28165.47), "bad_number", "decimal string"),
        (_frame(t="3071245454"), "bad_number", "'t'"),
        (_frame(m="yes"), "bad_flag", "'m'"),
        (_frame(e="aggTrade"), "unexpected_event", "aggTrade"),
        ({"result": None, "id": 1}, "unexpected_event", "None"),
        (_frame(s="ETHUSDT"), "stream_mismatch", "btcusdt@trade"),
        (_frame(s="BTC-USD"), "bad_symbol", "BTC-USD"),
        (_frame(p="0.000000001"), "invalid_value", "price"),  # more than 8 decimal places
        (_frame(p="12345678901.5"), "invalid_value", "price"),  # more than 10 integer digits
        (_frame(T=10**20), "invalid_value", "does not fit"),
    ],
)
def test_malformed_frames_raise_one_specific_reason(frame, code, names):
    raw = frame if isinstance(frame, str) else json.dumps(frame)
    with pytest.raises(MalformedTradeMessage) as caught:
        normalise_trade(raw)
    assert caught.value.code == code
    assert names in str(caught.value)
