"""Decode many framed Avro messages at once, straight into Arrow columns.

``fastavro`` decodes one message into one dict of Python objects (a Decimal per price, a
datetime per timestamp), which costs about as much per message as consuming it from Kafka.
This decoder walks every message of a batch in lock-step, field by field, with numpy: each
step reads one field of all messages at once (zig-zag varints, length-prefixed strings and
bytes, enum and union indexes, array and map blocks), and the columns are built from the
positions it found without creating a Python object per value.

It covers the types K2's V2 schemas use: string, int/long (also timestamp-micros), enum,
bytes as decimal, a union of null and one of these, and arrays and maps of strings. A message
is *regular* when it decodes completely with no surprise: the K2 framing, every length and index
in range, UTF-8 strings, a decimal of at most 8 bytes that fits the column's precision, a
timestamp a Python datetime can hold, no bytes left over. Anything else (a truncated or foreign
message, a value the table cannot store, an unusually long array) is *irregular*: the caller
decodes those one by one with fastavro (``k2_resources.schemas.avro``), which gives the exact
error for a dead letter. So the result for every message is what fastavro would give; the batch
just does not pay per-message Python cost for the regular ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from k2_resources.schemas.avro import _HEADER, MAGIC_BYTE
from k2_resources.schemas.errors import UnsupportedSchema

# Python's datetime range (years 1..9999) in microseconds from the epoch: fastavro cannot turn a
# timestamp-micros outside it into a datetime, so such a message is irregular.
_MIN_MICROS = -62_135_596_800_000_000
_MAX_MICROS = 253_402_300_799_999_999
# More items than this in one array/map block: decoded by fastavro instead (keeps the lock-step
# loop short; K2 records carry a handful of vendor fields).
MAX_BLOCK_ITEMS = 256


@dataclass(frozen=True)
class ColumnarBatch:
    """Decoded messages: ``table`` has the regular messages' rows in input order, ``rows`` their
    input positions; ``irregular`` the input positions to decode one by one."""

    table: pa.Table
    rows: np.ndarray
    irregular: np.ndarray


class _Walk:
    """The lock-step cursor: the concatenated message bodies, each message's position and end,
    and which messages are still regular."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, ok: np.ndarray) -> None:
        self.data, self.pos, self.end, self.ok = data, starts.copy(), ends, ok

    def fail(self, rows: np.ndarray) -> None:
        self.ok[rows] = False

    def varint(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A zig-zag varint (Avro int/long) at each of ``rows``: (rows still regular, their values)."""
        at = self.pos[rows]
        inside = at < self.end[rows]
        if not inside.all():
            self.fail(rows[~inside])
            rows, at = rows[inside], at[inside]
        first = self.data[at]
        if (first < 0x80).all():  # one byte each: string lengths, enum and union indexes, small counts
            self.pos[rows] = at + 1
            small = first.astype(np.int64)
            return rows, (small >> 1) ^ -(small & 1)
        result = np.zeros(rows.size, np.uint64)
        pending = np.arange(rows.size)
        done = np.zeros(rows.size, bool)
        for index in range(10):
            at = self.pos[rows[pending]] + index
            inside = at < self.end[rows[pending]]
            if not inside.all():
                pending, at = pending[inside], at[inside]
            byte = self.data[at].astype(np.uint64)
            if index == 9:
                byte[byte > 1] = 0x80  # more than 64 bits: leave it pending, so it fails below
            result[pending] |= (byte & np.uint64(0x7F)) << np.uint64(7 * index)
            last = (byte & np.uint64(0x80)) == 0
            finished = pending[last]
            done[finished] = True
            self.pos[rows[finished]] += index + 1
            pending = pending[~last]
            if pending.size == 0:
                break
        if not done.all():
            self.fail(rows[~done])
            rows, result = rows[done], result[done]
        values = (result >> np.uint64(1)).astype(np.int64) ^ -(result & np.uint64(1)).astype(np.int64)
        return rows, values

    def span(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A length-prefixed string/bytes at each of ``rows``: (rows still regular, starts, lengths)."""
        rows, lengths = self.varint(rows)
        starts = self.pos[rows]
        fits = (lengths >= 0) & (lengths <= self.end[rows] - starts)
        if not fits.all():
            self.fail(rows[~fits])
            rows, starts, lengths = rows[fits], starts[fits], lengths[fits]
        self.pos[rows] += lengths
        return rows, starts, lengths


def _large_strings(data: np.ndarray, offsets: np.ndarray) -> pa.Array:
    return pa.Array.from_buffers(pa.large_string(), offsets.size - 1, [None, pa.py_buffer(offsets), pa.py_buffer(data)])


def _spans(data: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """The spans (ascending ``starts``, ``lengths``) of ``data`` as a large_string array, not validated.

    The spans and the gaps between them are laid over ``data`` as one array of 2n strings (its
    offsets are ascending because the spans are), and Arrow copies the even ones out.
    """
    if starts.size == 0:
        return pa.array([], pa.large_string())
    bounds = np.empty(2 * starts.size + 1, np.int64)
    bounds[0:-1:2] = starts
    bounds[1::2] = starts + lengths
    bounds[-1] = bounds[-2]
    overlay = pa.Array.from_buffers(
        pa.large_string(), 2 * starts.size, [None, pa.py_buffer(bounds), pa.py_buffer(data)]
    )
    return overlay.take(pa.array(np.arange(0, 2 * starts.size, 2)))


def _invalid_utf8(data: np.ndarray, rows: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The rows whose span is not UTF-8 (checked one by one: only after a column failed validation)."""
    bad = []
    for row, start, length in zip(rows.tolist(), starts.tolist(), lengths.tolist()):
        try:
            data[start : start + length].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            bad.append(row)
    return np.array(bad, np.int64)


class _Column:
    """How one Avro field is read (``read``) and then built into an Arrow column (``build``)."""

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        raise NotImplementedError

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        raise NotImplementedError

    def invalid_utf8_rows(self) -> np.ndarray:
        """Rows holding text that is not UTF-8 (asked only when a built column failed validation)."""
        return np.zeros(0, np.int64)


class _Long(_Column):
    def __init__(self, n: int, timestamp: bool) -> None:
        self.values = np.zeros(n, np.int64)
        self.timestamp = timestamp

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        rows, values = walk.varint(rows)
        if self.timestamp:
            fits = (values >= _MIN_MICROS) & (values <= _MAX_MICROS)
            if not fits.all():
                walk.fail(rows[~fits])
        self.values[rows] = values

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        values = np.ascontiguousarray(self.values[keep])
        return pa.Array.from_buffers(arrow_type, values.size, [None, pa.py_buffer(values)])


class _String(_Column):
    def __init__(self, n: int, data: np.ndarray) -> None:
        self.data = data
        self.starts = np.zeros(n, np.int64)
        self.lengths = np.zeros(n, np.int64)

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        rows, starts, lengths = walk.span(rows)
        self.starts[rows], self.lengths[rows] = starts, lengths
        self.read_rows = rows

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        array = _spans(self.data, self.starts[keep], self.lengths[keep])
        return array if arrow_type == pa.large_string() else array.cast(arrow_type)

    def invalid_utf8_rows(self) -> np.ndarray:
        rows = getattr(self, "read_rows", np.zeros(0, np.int64))
        return _invalid_utf8(self.data, rows, self.starts[rows], self.lengths[rows])


class _Enum(_Column):
    def __init__(self, n: int, symbols: Sequence[str]) -> None:
        self.symbols = pa.array(list(symbols), pa.large_string())
        self.index = np.zeros(n, np.int64)

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        rows, index = walk.varint(rows)
        fits = (index >= 0) & (index < len(self.symbols))
        if not fits.all():
            walk.fail(rows[~fits])
        self.index[rows] = np.where(fits, index, 0)

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        array = self.symbols.take(pa.array(self.index[keep]))
        return array if arrow_type == pa.large_string() else array.cast(arrow_type)


class _Decimal(_Column):
    """Avro bytes/decimal: big-endian two's complement of the unscaled value (1 to 8 bytes here)."""

    def __init__(self, n: int, precision: int) -> None:
        self.values = np.zeros(n, np.int64)
        self.limit = 10**precision if precision <= 18 else None

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        rows, starts, lengths = walk.span(rows)
        if self.limit is None:  # wider than int64 holds: every row takes the general decoder
            walk.fail(rows)
            return
        limit = self.limit
        fits = (lengths >= 1) & (lengths <= 8)
        if not fits.all():
            walk.fail(rows[~fits])
            rows, starts, lengths = rows[fits], starts[fits], lengths[fits]
        value = np.zeros(rows.size, np.uint64)
        for index in range(8):
            has = lengths > index
            byte = walk.data[np.where(has, starts + index, 0)].astype(np.uint64)
            value = np.where(has, (value << np.uint64(8)) | byte, value)
        # Sign-extend from 8 * length bits.
        shift = np.uint64(64) - (lengths.astype(np.uint64) * np.uint64(8))
        signed = (value << shift).astype(np.int64) >> shift.astype(np.int64)
        fits = (signed > -limit) & (signed < limit)
        if not fits.all():
            walk.fail(rows[~fits])
        self.values[rows] = signed

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        values = self.values[keep]
        pairs = np.empty((values.size, 2), np.int64)
        pairs[:, 0] = values
        pairs[:, 1] = values >> 63  # the high 64 bits of the 128-bit little-endian value
        return pa.Array.from_buffers(arrow_type, values.size, [None, pa.py_buffer(pairs)])


class _Nullable(_Column):
    """A union of null and one other type."""

    def __init__(self, n: int, inner: _Column, null_index: int) -> None:
        self.inner, self.null_index = inner, null_index
        self.present = np.zeros(n, bool)

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        rows, branch = walk.varint(rows)
        fits = (branch == 0) | (branch == 1)
        if not fits.all():
            walk.fail(rows[~fits])
            rows, branch = rows[fits], branch[fits]
        present = rows[branch != self.null_index]
        self.present[present] = True
        self.inner.read(walk, present)

    def invalid_utf8_rows(self) -> np.ndarray:
        return self.inner.invalid_utf8_rows()

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        array = self.inner.build(keep, arrow_type)
        missing = ~self.present[keep]
        if not missing.any():
            return array
        if isinstance(array, (pa.ListArray, pa.LargeListArray, pa.MapArray)):
            return _with_nulls(array, missing)
        validity = pa.array(~missing).buffers()[1]
        return pa.Array.from_buffers(array.type, len(array), [validity, *array.buffers()[1:]])


def _with_nulls(array: pa.Array, missing: np.ndarray) -> pa.Array:
    """A list/map array with the ``missing`` rows null (their offsets stay, with no items)."""
    offsets = array.offsets
    if isinstance(array, pa.MapArray):
        return pa.MapArray.from_arrays(offsets, array.keys, array.items, type=array.type, mask=pa.array(missing))
    return type(array).from_arrays(offsets, array.values, type=array.type, mask=pa.array(missing))


class _Items(_Column):
    """An Avro array of strings (``pairs`` False) or map of string to string (``pairs`` True)."""

    def __init__(self, n: int, data: np.ndarray, pairs: bool) -> None:
        self.data, self.pairs, self.n = data, pairs, n
        self.counts = np.zeros(n, np.int64)
        self.pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def _string(self, walk: _Walk, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return walk.span(rows)

    def invalid_utf8_rows(self) -> np.ndarray:
        bad = []
        for row, _, key_starts, key_lengths, value_starts, value_lengths in self.pieces:
            bad.append(_invalid_utf8(self.data, row, key_starts, key_lengths))
            if self.pairs:
                bad.append(_invalid_utf8(self.data, row, value_starts, value_lengths))
        return np.concatenate(bad) if bad else np.zeros(0, np.int64)

    def read(self, walk: _Walk, rows: np.ndarray) -> None:
        while rows.size:
            rows, count = walk.varint(rows)
            sized = count < 0
            if sized.any():  # a negative count is followed by the block's size in bytes
                sized_rows, _ = walk.varint(rows[sized])
                keep = ~sized | np.isin(rows, sized_rows)
                rows, count = rows[keep], np.abs(count[keep])
            # Each item takes at least one byte per string: a count beyond the bytes left is bad.
            fits = (count <= (walk.end[rows] - walk.pos[rows])) & (count <= MAX_BLOCK_ITEMS)
            if not fits.all():
                walk.fail(rows[~fits])
                rows, count = rows[fits], count[fits]
            more = count > 0
            rows, count = rows[more], count[more]
            for item in range(int(count.max()) if count.size else 0):
                active = rows[count > item]
                active = active[walk.ok[active]]
                key_rows, key_starts, key_lengths = self._string(walk, active)
                if self.pairs:
                    value_rows, value_starts, value_lengths = self._string(walk, key_rows)
                    matched = np.isin(key_rows, value_rows)
                    key_rows, key_starts, key_lengths = key_rows[matched], key_starts[matched], key_lengths[matched]
                else:
                    value_rows, value_starts, value_lengths = key_rows, key_starts, key_lengths
                order = self.counts[key_rows].copy()
                self.counts[key_rows] += 1
                self.pieces.append((key_rows, order, key_starts, key_lengths, value_starts, value_lengths))
            rows = rows[walk.ok[rows]]

    def build(self, keep: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
        counts = self.counts[keep]
        offsets = np.zeros(keep.size + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        if self.pieces:
            row, order, key_starts, key_lengths, value_starts, value_lengths = (
                np.concatenate(p) for p in zip(*self.pieces)
            )
        else:
            row = order = key_starts = key_lengths = value_starts = value_lengths = np.zeros(0, np.int64)
        # Only the items of kept rows, grouped by row in the order they were read.
        position = np.full(self.n, -1, np.int64)
        position[keep] = np.arange(keep.size)
        mine = position[row] >= 0
        row, order = position[row[mine]], order[mine]
        sort = np.lexsort((order, row))
        if isinstance(arrow_type, pa.MapType):
            keys = _spans(self.data, key_starts[mine][sort], key_lengths[mine][sort])
            items = _spans(self.data, value_starts[mine][sort], value_lengths[mine][sort])
            return pa.MapArray.from_arrays(
                pa.array(offsets.astype(np.int32)),
                keys.cast(arrow_type.key_type),
                items.cast(arrow_type.item_type),
                type=arrow_type,
            )
        values = _spans(self.data, key_starts[mine][sort], key_lengths[mine][sort])
        list_type = pa.LargeListArray if pa.types.is_large_list(arrow_type) else pa.ListArray
        offset_type = np.int64 if list_type is pa.LargeListArray else np.int32
        return list_type.from_arrays(
            pa.array(offsets.astype(offset_type)), values.cast(arrow_type.value_type), type=arrow_type
        )


def _logical(schema: Any) -> str | None:
    return schema.get("logicalType") if isinstance(schema, dict) else None


def _column_for(schema: Any, n: int, data: np.ndarray) -> _Column:
    """The reader of one Avro (parsed, fastavro) field type; UnsupportedSchema for the rest."""
    if isinstance(schema, list):
        branches = [b for b in schema if b != "null"]
        if len(schema) != 2 or len(branches) != 1:
            raise UnsupportedSchema(f"union {schema}")
        return _Nullable(n, _column_for(branches[0], n, data), schema.index("null"))
    kind = schema["type"] if isinstance(schema, dict) else schema
    if kind == "string":
        return _String(n, data)
    if kind in ("long", "int"):
        return _Long(n, timestamp=_logical(schema) == "timestamp-micros")
    if kind == "bytes" and _logical(schema) == "decimal":
        return _Decimal(n, int(schema["precision"]))
    if kind == "enum":
        return _Enum(n, schema["symbols"])
    if kind == "array" and schema["items"] == "string":
        return _Items(n, data, pairs=False)
    if kind == "map" and schema["values"] == "string":
        return _Items(n, data, pairs=True)
    raise UnsupportedSchema(f"type {schema}")


def decode_columnar(
    values: Sequence[bytes | None],
    parsed_schema: dict,
    schema_id: int,
    arrow_schema: pa.Schema,
    extra: dict[str, pa.Array] | None = None,
) -> ColumnarBatch:
    """Decode the framed Avro ``values`` (record schema ``parsed_schema``, framing id ``schema_id``)
    into ``arrow_schema``; ``extra`` supplies columns that are not in the Avro record (one value per
    input message, e.g. the Kafka offset), or overrides fields that are.

    Raises UnsupportedSchema when the schema has a type this decoder does not cover.
    """
    n = len(values)
    fields = parsed_schema["fields"]
    framed_values = (
        values.cast(pa.large_binary()) if isinstance(values, pa.Array) else pa.array(values, pa.large_binary())
    )
    offsets = (
        np.frombuffer(framed_values.buffers()[1], np.int64, n + 1, framed_values.offset * 8)
        if n
        else np.zeros(1, np.int64)
    )
    data = (
        np.frombuffer(framed_values.buffers()[2], np.uint8)
        if n and framed_values.buffers()[2]
        else np.zeros(0, np.uint8)
    )
    starts, ends = offsets[:-1] + _HEADER.size, offsets[1:]
    # The K2 framing (magic byte, schema id) in front of every message, checked for all at once.
    ok = (ends >= starts) & ~np.asarray(framed_values.is_null(), bool)
    for index, expected in enumerate(_HEADER.pack(MAGIC_BYTE, schema_id)):
        ok[ok] = data[starts[ok] - _HEADER.size + index] == expected
    walk = _Walk(data, np.where(ok, starts, ends), ends, ok)
    columns = {field["name"]: _column_for(field["type"], n, data) for field in fields}
    for field in fields:
        rows = np.flatnonzero(walk.ok)
        if rows.size == 0:
            break
        columns[field["name"]].read(walk, rows)
    walk.ok &= walk.pos == walk.end  # bytes left over: not what the encoder writes
    extra = extra or {}
    for _ in range(2):
        keep = np.flatnonzero(walk.ok)
        arrays = []
        for target in arrow_schema:
            if target.name in extra:
                arrays.append(extra[target.name].take(pa.array(keep)).cast(target.type))
            elif target.name in columns:
                arrays.append(columns[target.name].build(keep, target.type))
            else:
                arrays.append(pa.nulls(keep.size, target.type))
        table = pa.Table.from_arrays(arrays, schema=arrow_schema)
        try:
            table.validate(full=True)  # UTF-8 of every string, checked once per column
            break
        except pa.ArrowInvalid:
            # Some text is not UTF-8: those rows are irregular (fastavro names the error), build again.
            for column in columns.values():
                walk.fail(column.invalid_utf8_rows())
    else:
        raise AssertionError("a column stayed invalid after its non-UTF-8 rows were taken out")
    return ColumnarBatch(table, keep, np.flatnonzero(~walk.ok))
