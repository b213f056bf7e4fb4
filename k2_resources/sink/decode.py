"""Decoding and screening one offset range's messages into rows of ``market.trades``.

All messages are decoded at once into Arrow columns; the few that path does not take are decoded
one by one with fastavro, which gives the reason a dead letter carries, and screened for
storability: a record that decodes but cannot be stored (a price beyond decimal(18,8), a value
Arrow rejects) becomes a dead letter instead of failing its batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from k2_resources.catalog.resource import to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.errors import SchemaMismatchError
from k2_resources.schemas import TRADE_V2, decode_trade
from k2_resources.schemas.avro import TRADE_V2_SCHEMA_ID
from k2_resources.schemas.columnar import UnsupportedSchema, decode_columnar

log = logging.getLogger(__name__)


def _no_rows() -> pa.Table:
    return TRADES.arrow_schema().empty_table()


@dataclass
class BatchRead:
    """What was read from one offset range: the storable rows as one Arrow table in offset order."""

    rows: pa.Table = field(default_factory=_no_rows, repr=False)  # market.trades' schema; platform_sequence = offset
    dead_letters: list[tuple[int, bytes, str]] = field(default_factory=list)  # (offset, raw, reason)
    last_offset_seen: int = -1
    lost: list[tuple[int, int]] = field(default_factory=list)  # [start, end) deleted by retention before the read
    raw_values: list[bytes] = field(default_factory=list, repr=False)  # the message of each row, same order

    @property
    def records(self) -> list[dict]:
        """The rows as dicts of Python values, as ``decode_trade`` gives them (Decimal, aware
        datetime, dict vendor_data); costs a Python object per value, so prefer ``rows``."""
        return rows_to_records(self.rows)


def rows_to_records(rows: pa.Table) -> list[dict]:
    """Rows of market.trades' Arrow schema as record dicts (maps as dicts, as fastavro decodes them)."""
    records = rows.to_pylist()
    for record in records:
        if record.get("vendor_data") is not None:
            record["vendor_data"] = dict(record["vendor_data"])
    return records


def decode_batch(offsets: list[int] | pa.Array, values: list[bytes | None] | pa.Array) -> BatchRead:
    """Decode the messages (Kafka offsets and framed TradeV2 values) of one range into rows.

    All messages are decoded at once into Arrow columns (``decode_columnar``); only the ones that
    path does not take (malformed, unstorable, unusual) are decoded one by one with fastavro, which
    gives the reason a dead letter carries. The Kafka offset becomes ``platform_sequence``.
    """
    result = BatchRead()
    offset_array = offsets if isinstance(offsets, pa.Array) else pa.array(offsets, pa.int64())
    if len(offset_array) == 0:
        return result
    result.last_offset_seen = int(offset_array[-1].as_py())
    try:
        decoded = decode_columnar(
            values, TRADE_V2, TRADE_V2_SCHEMA_ID, TRADES.arrow_schema(), {"platform_sequence": offset_array}
        )
        rows, kept, irregular = decoded.table, decoded.rows.tolist(), decoded.irregular.tolist()
    except UnsupportedSchema as exc:  # a schema change this decoder does not cover yet: the slow, exact path
        log.warning("decoding %d messages one by one: %s", len(offset_array), exc)
        rows, kept, irregular = _no_rows(), [], list(range(len(offset_array)))
    if isinstance(values, pa.Array):
        value_at = lambda i: values[i].as_py()  # noqa: E731 - the few irregular messages only
        result.raw_values = values.take(pa.array(kept, pa.int64())).to_pylist()
    else:
        value_at = values.__getitem__
        result.raw_values = [values[i] for i in kept]
    if not irregular:
        result.rows = rows
        return result
    # The few that need a closer look: decoded with fastavro, then screened for storability.
    slow = _RecordsRead()
    for position in irregular:
        _decode_into(slow, int(offset_array[position].as_py()), value_at(position))
    slow = _screen_storable(slow)
    result.dead_letters = sorted(slow.dead_letters, key=lambda letter: letter[0])
    if slow.records_:
        both = pa.concat_tables([rows, to_arrow(slow.records_, TRADES)])
        order = pc.sort_indices(both["platform_sequence"]).to_numpy()
        raws = result.raw_values + slow.raw_values
        result.rows = both.take(order)
        result.raw_values = [raws[i] for i in order.tolist()]
    else:
        result.rows = rows
    return result


@dataclass
class _RecordsRead:
    """Messages decoded one by one into dicts (the fallback of ``decode_batch``)."""

    records_: list[dict] = field(default_factory=list)
    dead_letters: list[tuple[int, bytes, str]] = field(default_factory=list)
    raw_values: list[bytes] = field(default_factory=list)


def _decode_into(result: Any, offset: int, value: bytes | None) -> None:
    try:
        if value is None:
            raise SchemaMismatchError("a message with no value (a tombstone) is not a trade")
        record = decode_trade(value)
        # The Kafka offset is the platform's sequence: it orders the partition's log.
        record["platform_sequence"] = offset
    except SchemaMismatchError as exc:
        result.dead_letters.append((offset, value or b"", f"undecodable: {exc}"))
        return
    except Exception as exc:
        result.dead_letters.append((offset, value or b"", f"undecodable: {type(exc).__name__}: {exc}"))
        return
    result.records_.append(record)
    result.raw_values.append(value or b"")


def unstorable_reason(record: dict) -> str | None:
    """Why ``record`` cannot be stored in market.trades (the Arrow conversion's error), or None."""
    try:
        to_arrow([record], TRADES)
    except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return f"unstorable in market.trades: {type(exc).__name__}: {exc}"
    return None


def _screen_storable(result: _RecordsRead) -> _RecordsRead:
    """Move records that decode but cannot be stored (a poison record) to the dead letters.

    The whole batch is converted once; only when that fails is each record tried alone, so the
    common case costs one conversion and a poison record never fails its batch.
    """
    if not result.records_ or unstorable_reason_of_batch(result.records_) is None:
        return result
    kept, raws = [], []
    for record, raw in zip(result.records_, result.raw_values):
        reason = unstorable_reason(record)
        if reason is None:
            kept.append(record)
            raws.append(raw)
        else:
            result.dead_letters.append((int(record["platform_sequence"]), raw, reason))
    result.dead_letters.sort(key=lambda letter: letter[0])
    result.records_, result.raw_values = kept, raws
    return result


def unstorable_reason_of_batch(records: list[dict]) -> str | None:
    """None when every record converts to the table's Arrow schema; else the first error."""
    try:
        to_arrow(records, TRADES)
    except (pa.ArrowException, ValueError, TypeError, OverflowError, ArithmeticError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None
