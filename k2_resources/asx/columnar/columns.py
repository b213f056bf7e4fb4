"""Stage 5 of the column-wise trade reader: the V2 columns, dictionary-encoded where values repeat.

Ids (message and trade ids from line numbers), vendor data, constant columns.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from k2_resources.catalog.tables import TRADES

_VENDOR_KEYS = ("company_id", "qualifier_code", "venue", "field_7")


def _encoded(field: pa.Field) -> pa.Field:
    """``field`` with its string values dictionary-encoded (lists and maps: their string children)."""
    kind = field.type
    if pa.types.is_large_string(kind) or pa.types.is_decimal(kind):
        return field.with_type(pa.dictionary(pa.int32(), kind))
    if pa.types.is_map(kind):
        return field.with_type(pa.map_(_encoded(kind.key_field), _encoded(kind.item_field)))
    if pa.types.is_large_list(kind):
        return field.with_type(pa.large_list(_encoded(kind.value_field)))
    return field


# Columns whose values repeat (one symbol per file, constants, prices, volumes, qualifiers, vendor
# data) are built dictionary-encoded: index arrays into the distinct values, no per-row copies.
# The rows are the V2 rows all the same (``table.cast(TRADES.arrow_schema())`` decodes them);
# k2_resources.asx.writes writes them as they are.
_ENCODED_COLUMNS = (
    "symbol",
    "exchange",
    "asset_class",
    "price",
    "quantity",
    "currency",
    "side",
    "trade_conditions",
    "vendor_data",
)
ENCODED_SCHEMA = pa.schema(
    [_encoded(field) if field.name in _ENCODED_COLUMNS else field for field in TRADES.arrow_schema()],
    metadata=TRADES.arrow_schema().metadata,
)


def dictionary_array(indices: np.ndarray, values: pa.Array) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(
        pa.array(indices.astype(np.int32, copy=False)), values.cast(pa.large_string())
    )


def repeated(text: str, zeros: pa.Array) -> pa.DictionaryArray:
    """``text`` on every row: ``zeros`` (int32 indices, shared by every such column) into [text]."""
    return pa.DictionaryArray.from_arrays(zeros, pa.array([text], type=pa.large_string()))


def _non_empty(values: pl.Series) -> np.ndarray:
    return (values.str.len_bytes() > 0).to_numpy()


def vendor_data(company_id: str, fields: dict[str, tuple[pl.Series, np.ndarray]]) -> pa.Array:
    """vendor_data per row: company_id and qualifier_code always, venue and field_7 when not empty,
    in that order; keys and values are index arrays into the distinct texts."""
    qualifiers, qualifier_index = fields["qualifier"]
    venues, venue_index = fields["venue"]
    sevenths, seventh_index = fields["field_7"]
    rows = len(qualifier_index)
    venue_base, seventh_base = 1 + len(qualifiers), 1 + len(qualifiers) + len(venues)
    # Every row has company_id and qualifier_code: a row-major grid of two cells per row. A venue
    # or a 7th field is rare in real files, so they are inserted after their row's two cells in one
    # pass, venue first.
    values = np.empty((rows, 2), dtype=np.int32)
    values[:, 0] = 0
    values[:, 1] = qualifier_index
    values[:, 1] += 1
    keys = np.empty((rows, 2), dtype=np.int32)
    keys[:, 0], keys[:, 1] = 0, 1
    with_venue = np.flatnonzero(_non_empty(venues)[venue_index])
    with_seventh = np.flatnonzero(_non_empty(sevenths)[seventh_index])
    value_index, key_index = values.ravel(), keys.ravel()
    if len(with_venue) or len(with_seventh):
        at = np.concatenate([2 * (with_venue + 1), 2 * (with_seventh + 1)])
        order = np.argsort(at, kind="stable")  # a row's venue (listed first) before its 7th field
        extra_values = np.concatenate(
            [venue_base + venue_index[with_venue], seventh_base + seventh_index[with_seventh]]
        )
        extra_keys = np.repeat(np.array([2, 3], dtype=np.int32), [len(with_venue), len(with_seventh)])
        value_index = np.insert(value_index, at[order], extra_values[order].astype(np.int32))
        key_index = np.insert(key_index, at[order], extra_keys[order])
    extras = np.zeros(rows, dtype=np.int32)
    extras[with_venue] += 1
    extras[with_seventh] += 1
    offsets = np.empty(rows + 1, dtype=np.int32)
    offsets[0] = 0
    np.cumsum(extras + 2, out=offsets[1:])
    distinct = pl.concat([pl.Series([company_id], dtype=pl.String), qualifiers, venues, sevenths]).to_arrow()
    return pa.MapArray.from_arrays(
        pa.array(offsets, type=pa.int32()),
        dictionary_array(key_index, pa.array(list(_VENDOR_KEYS))),
        dictionary_array(value_index, distinct),
        type=ENCODED_SCHEMA.field("vendor_data").type,
    )


# More runs of equal-width numbers than this: the ids are joined by pyarrow instead.
_MAX_WIDTH_RUNS = 64


def prefixed(prefix: str, numbers: pa.LargeStringArray) -> pa.Array:
    """``prefix`` + each of ``numbers`` (decimal texts), as one large_string array.

    Line numbers in time order rise, so their texts come in a few runs of one width; each run is
    a grid of fixed-width rows, filled with the prefix and then the digits in two copies, much
    cheaper than pyarrow's ``binary_join_element_wise`` row by row."""
    count = len(numbers)
    offsets = np.frombuffer(numbers.buffers()[1], dtype=np.int64)[numbers.offset : numbers.offset + count + 1]
    widths = np.diff(offsets)
    run_starts = np.flatnonzero(np.diff(widths)) + 1
    if count == 0 or numbers.null_count or len(run_starts) >= _MAX_WIDTH_RUNS:
        return pc.binary_join_element_wise(_large(prefix), numbers, _large(""))
    digits = np.frombuffer(numbers.buffers()[2], dtype=np.uint8)
    head = np.frombuffer(prefix.encode("utf-8"), dtype=np.uint8)
    out = np.empty(int(offsets[-1] - offsets[0]) + len(head) * count, dtype=np.uint8)
    at = 0
    bounds = np.concatenate([[0], run_starts, [count]])
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        width, rows = int(widths[start]), end - start
        grid = out[at : at + rows * (len(head) + width)].reshape(rows, len(head) + width)
        grid[:, : len(head)] = head
        grid[:, len(head) :] = digits[offsets[start] : offsets[end]].reshape(rows, width)
        at += rows * (len(head) + width)
    new_offsets = (offsets - offsets[0]) + len(head) * np.arange(count + 1, dtype=np.int64)
    return pa.LargeStringArray.from_buffers(count, pa.py_buffer(new_offsets), pa.py_buffer(out))


def _large(text: str) -> pa.Scalar:
    return pa.scalar(text, type=pa.large_string())
