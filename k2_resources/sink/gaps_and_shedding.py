"""Per-batch sequence gaps and the rows GRACEFUL degradation defers (decided once per symbol)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from k2_resources.degradation.shedding import LoadShedder
from k2_resources.sink.decode import rows_to_records


def sequence_gaps_of(rows: pa.Table) -> dict[str, int]:
    """Trade ids missing inside this batch, per symbol (Binance ids are contiguous per symbol).

    Column-wise over ``rows`` (symbol, source_sequence); the same as ``sequence_gaps``.
    """
    sequence = rows.column("source_sequence").combine_chunks()
    present = pc.is_valid(sequence)
    values = np.asarray(sequence.filter(present), np.int64)
    if values.size < 2:
        return {}
    if values.min() < -(2**62) or values.max() > 2**62:  # differences could overflow int64: count in Python
        return sequence_gaps(rows_to_records(rows.select(["symbol", "source_sequence"])))
    encoded = pc.dictionary_encode(rows.column("symbol").combine_chunks().filter(present))
    symbol = np.asarray(encoded.indices, np.int64)
    order = np.lexsort((values, symbol))
    symbol, values = symbol[order], values[order]
    step = np.diff(values)
    missing = np.where((symbol[1:] == symbol[:-1]) & (step > 1), step - 1, 0)
    per_symbol = np.zeros(len(encoded.dictionary), np.int64)
    np.add.at(per_symbol, symbol[1:], missing)
    names = encoded.dictionary.to_pylist()
    return {names[i]: int(count) for i, count in enumerate(per_symbol.tolist()) if count}


def sequence_gaps(records: list[dict]) -> dict[str, int]:
    """Trade ids missing inside this batch, per symbol (Binance ids are contiguous per symbol)."""
    ids: dict[str, list[int]] = {}
    for record in records:
        sequence = record.get("source_sequence")
        if sequence is not None:
            ids.setdefault(record["symbol"], []).append(int(sequence))
    gaps: dict[str, int] = {}
    for symbol, values in ids.items():
        values.sort()
        missing = sum(b - a - 1 for a, b in zip(values, values[1:]) if b - a > 1)
        if missing:
            gaps[symbol] = missing
    return gaps


def split_rows(rows: pa.Table, shedder: LoadShedder, level: int) -> tuple[pa.Table, dict[str, int]]:
    """(rows kept now, deferred row count per symbol) at degradation ``level`` (``LoadShedder.split``
    for a table: the decision is taken once per distinct symbol)."""
    if rows.num_rows == 0:
        return rows, {}
    encoded = pc.dictionary_encode(rows.column("symbol").combine_chunks())
    names = encoded.dictionary.to_pylist()
    deferred_symbols = [i for i, symbol in enumerate(names) if shedder.should_defer(symbol, level)]
    if not deferred_symbols:
        return rows, {}
    symbol = np.asarray(encoded.indices, np.int64)
    deferred = np.isin(symbol, deferred_symbols)
    counts = np.bincount(symbol[deferred], minlength=len(names))
    return rows.filter(pa.array(~deferred)), {names[i]: int(counts[i]) for i in deferred_symbols if counts[i]}


def symbol_mask(symbols: pa.ChunkedArray, wanted: Callable[[str], bool]) -> pa.Array:
    """A boolean per row: ``wanted(symbol)``, decided once per distinct symbol."""
    encoded = pc.dictionary_encode(symbols.combine_chunks())
    chosen = [i for i, symbol in enumerate(encoded.dictionary.to_pylist()) if wanted(symbol)]
    return pa.array(np.isin(np.asarray(encoded.indices, np.int64), chosen), pa.bool_())
