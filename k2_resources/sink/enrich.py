"""Enrichment of NORMAL operation: ``k2.notional`` and ``k2.tier`` added to each row's vendor_data.

Both can be recomputed from the row, which is why SOFT and above may skip them.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2_resources.degradation.shedding import LoadShedder

NOTIONAL_KEY = "k2.notional"


TIER_KEY = "k2.tier"


def enrich_rows(rows: pa.Table, shedder: LoadShedder) -> pa.Table:
    """``rows`` with the derived fields of NORMAL operation added to each row's vendor_data.

    ``k2.notional``: price x quantity, an exact decimal string (the traded value in the quote
    currency); ``k2.tier``: the symbol's load-shedding tier when it was ingested. Both can be
    recomputed from the row, which is why SOFT and above may skip them. Column-wise; ``enrich``
    is the same definition record by record.
    """
    if rows.num_rows == 0:
        return rows
    notional = notional_strings(rows.column("price").combine_chunks(), rows.column("quantity").combine_chunks())
    tiers = _per_symbol(rows.column("symbol"), lambda symbol: str(shedder.tier(symbol)))
    index = rows.schema.get_field_index("vendor_data")
    vendor = _with_entries(rows.column(index).combine_chunks(), [(NOTIONAL_KEY, notional), (TIER_KEY, tiers)])
    return rows.set_column(index, rows.schema.field(index), vendor)


def notional_strings(price: pa.Array, quantity: pa.Array) -> pa.Array:
    """price x quantity of each row as the exact decimal in plain notation, trailing zeros dropped
    (what ``format(Decimal(p) * Decimal(q)).normalize(), "f")`` gives)."""
    product = pc.multiply(price, quantity)  # decimal128(18, 8) x decimal128(18, 8) -> decimal128(37, 16): exact
    text = pc.utf8_rtrim(pc.utf8_rtrim(pc.cast(product, pa.large_string()), characters="0"), characters=".")
    scientific = np.asarray(pc.match_substring(text, "E"), bool)
    if not scientific.any():
        return text
    # Arrow writes very small values in scientific notation: those few are formatted by Python.
    plain = text.to_pylist()
    for row in np.flatnonzero(scientific).tolist():
        plain[row] = _plain(Decimal(price[row].as_py()) * Decimal(quantity[row].as_py()))
    return pa.array(plain, pa.large_string())


def _plain(value: Decimal) -> str:
    return format(value.normalize(), "f")


def _per_symbol(symbols: pa.ChunkedArray | pa.Array, value_of: Callable[[str], str]) -> pa.Array:
    """``value_of(symbol)`` for each row, computed once per distinct symbol."""
    encoded = pc.dictionary_encode(symbols.combine_chunks() if isinstance(symbols, pa.ChunkedArray) else symbols)
    values = pa.array([value_of(symbol) for symbol in encoded.dictionary.to_pylist()], pa.large_string())
    return values.take(encoded.indices)


def _with_entries(maps: pa.MapArray, entries: list[tuple[str, pa.Array]]) -> pa.MapArray:
    """Each row's map with ``entries`` (key, one value per row) set, after its own entries (a
    null map counts as empty), like ``dict.update`` on each row."""
    n = len(maps)
    offsets = np.asarray(maps.offsets, np.int64)  # positions in the (whole, unsliced) key/item children
    counts = np.diff(offsets)
    counts[np.asarray(maps.is_null(), bool)] = 0  # a null row holds no entries, whatever its offsets say
    ends = np.cumsum(counts)
    positions = pa.array(np.repeat(offsets[:-1] - (ends - counts), counts) + np.arange(int(ends[-1]) if n else 0))
    keys, items = maps.keys.take(positions), maps.items.take(positions)
    rows = np.repeat(np.arange(n), counts)
    keep = ~np.asarray(pc.is_in(keys, pa.array([key for key, _ in entries], keys.type)), bool)
    if not keep.all():  # an entry of the same key is replaced
        keys, items, rows = keys.filter(pa.array(keep)), items.filter(pa.array(keep)), rows[keep]
        counts = np.bincount(rows, minlength=n).astype(np.int64)
    all_keys = pa.concat_arrays(
        [keys.cast(pa.large_string()), *[pa.array(np.full(n, key, object), pa.large_string()) for key, _ in entries]]
    )
    all_items = pa.concat_arrays(
        [items.cast(pa.large_string()), *[values.cast(pa.large_string()) for _, values in entries]]
    )
    all_rows = np.concatenate([rows, *[np.arange(n)] * len(entries)])
    order = pa.array(np.argsort(all_rows, kind="stable"))
    new_offsets = np.zeros(n + 1, np.int32)
    np.cumsum(counts + len(entries), out=new_offsets[1:])
    return pa.MapArray.from_arrays(
        pa.array(new_offsets),
        all_keys.take(order).cast(maps.type.key_type),
        all_items.take(order).cast(maps.type.item_type),
        type=maps.type,
    )


def enrich(records: list[dict], shedder: LoadShedder) -> None:
    """``enrich_rows`` for record dicts (in place): the per-record definition of the enrichment."""
    for record in records:
        vendor = dict(record.get("vendor_data") or {})
        price, quantity = record["price"], record["quantity"]
        notional = Decimal(price) * Decimal(quantity)
        vendor[NOTIONAL_KEY] = _plain(notional)
        vendor[TIER_KEY] = str(shedder.tier(record["symbol"]))
        record["vendor_data"] = vendor
