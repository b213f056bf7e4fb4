"""Avro encoding of V2 records on Kafka.

Framing of every K2 Kafka message value (the Confluent wire format, without a registry)::

    byte 0      magic byte 0x00
    bytes 1..4  schema id, big-endian unsigned int (1 = TradeV2, 2 = QuoteV2)
    bytes 5..   the record in Avro binary encoding (schemaless, fastavro)

The schema id lets a consumer reject a message written with another schema with a clear
error instead of decoding garbage; a schema registry can later take over the ids unchanged.
"""

from __future__ import annotations

import io
import json
import struct
from functools import cache
from pathlib import Path
from typing import Any, cast

import fastavro

from k2_resources.errors import SchemaMismatchError

MAGIC_BYTE = 0
TRADE_V2_SCHEMA_ID = 1
QUOTE_V2_SCHEMA_ID = 2
_HEADER = struct.Struct(">bI")
_SCHEMA_DIR = Path(__file__).parent


@cache
def _parsed(name: str) -> dict[str, Any]:
    return cast(dict[str, Any], fastavro.parse_schema(json.loads((_SCHEMA_DIR / f"{name}.avsc").read_text())))


TRADE_V2 = _parsed("trade_v2")
QUOTE_V2 = _parsed("quote_v2")
_SCHEMAS = {TRADE_V2_SCHEMA_ID: TRADE_V2, QUOTE_V2_SCHEMA_ID: QUOTE_V2}


def _encode(schema_id: int, record: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    buffer.write(_HEADER.pack(MAGIC_BYTE, schema_id))
    try:
        fastavro.schemaless_writer(buffer, _SCHEMAS[schema_id], record)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise SchemaMismatchError(
            f"record does not fit the V2 Avro schema ({exc}); build it with the pydantic "
            "model in k2_resources.schemas.models, which names the field at fault"
        ) from exc
    return buffer.getvalue()


def _decode(expected_id: int, payload: bytes) -> dict[str, Any]:
    if len(payload) < _HEADER.size:
        raise SchemaMismatchError(f"message of {len(payload)} bytes is too short for the K2 Avro framing")
    magic, schema_id = _HEADER.unpack_from(payload)
    if magic != MAGIC_BYTE or schema_id != expected_id:
        raise SchemaMismatchError(
            f"message has magic byte {magic} and schema id {schema_id}, expected 0 and {expected_id}: "
            "it was not written by K2's V2 encoder for this record type (check the topic name)"
        )
    record = fastavro.schemaless_reader(io.BytesIO(payload[_HEADER.size :]), _SCHEMAS[schema_id], None)
    return cast(dict[str, Any], record)  # a record schema decodes to a dict


def encode_trade(record: dict[str, Any]) -> bytes:
    """A TradeV2 record (dict of Python values) as a framed Avro message."""
    return _encode(TRADE_V2_SCHEMA_ID, record)


def decode_trade(payload: bytes) -> dict[str, Any]:
    """A framed Avro message back to a TradeV2 dict (Decimal prices, aware UTC datetimes)."""
    return _decode(TRADE_V2_SCHEMA_ID, payload)


def encode_quote(record: dict[str, Any]) -> bytes:
    """A QuoteV2 record as a framed Avro message."""
    return _encode(QUOTE_V2_SCHEMA_ID, record)


def decode_quote(payload: bytes) -> dict[str, Any]:
    """A framed Avro message back to a QuoteV2 dict."""
    return _decode(QUOTE_V2_SCHEMA_ID, payload)
