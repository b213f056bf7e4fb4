"""Stage 4 of the column-wise trade reader: the general path's field checks, vectorised.

Clock texts are read from their bytes; prices, volumes and qualifiers are checked once per
distinct value; each Sydney minute of a day gets its UTC offset once.
"""

from __future__ import annotations

import functools
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pyarrow as pa

from k2_resources.asx.sydney_time import _utc_offset


@functools.lru_cache(maxsize=64)
def minute_offsets_us(day: date) -> tuple[np.ndarray, np.ndarray]:
    """UTC offset (microseconds) of each Sydney minute of ``day``, and whether the minute has one."""
    midnight = datetime(day.year, day.month, day.day)
    offsets = [_utc_offset(midnight + timedelta(minutes=m)) for m in range(24 * 60)]
    valid = np.array([o is not None for o in offsets])
    micros = np.array([0 if o is None else o // timedelta(microseconds=1) for o in offsets], dtype=np.int64)
    valid.flags.writeable = micros.flags.writeable = False  # cached: shared by every caller
    return micros, valid


def _clock_micros(chunk: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds since midnight, valid) of one chunk of clock texts, read from their bytes.

    Valid is exactly what the general path accepts: ``_TIME`` (two ASCII digits, ':', two, ':',
    two, optionally '.' and 1-6 digits) with hour <= 23, minute <= 59, second <= 59; a shorter
    fraction counts as padded with zeros. A byte-level read costs a few vectorised passes, far
    less than string slicing and casting."""
    count = len(chunk)
    invalid = (np.zeros(count, dtype=np.int64), np.zeros(count, dtype=bool))
    _, offset_buffer, data_buffer = chunk.buffers()
    if count == 0 or data_buffer is None or data_buffer.size == 0:
        return invalid
    offset_type = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    offsets = np.frombuffer(offset_buffer, dtype=offset_type)[chunk.offset : chunk.offset + count + 1].astype(np.int64)
    data = np.frombuffer(data_buffer, dtype=np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)
    valid = (lengths == 8) | ((lengths >= 10) & (lengths <= 15))
    if chunk.null_count:
        valid &= ~np.asarray(chunk.is_null())

    uniform = int(lengths[0]) if count and (lengths == lengths[0]).all() else 0
    if uniform:  # every text has one length (the usual file): a row per text, each byte a column
        grid = data[offsets[0] : offsets[0] + count * uniform].reshape(count, uniform)

    def byte(position: int) -> np.ndarray:
        if uniform:
            return grid[:, min(position, uniform - 1)]  # past the end: ``valid`` already excludes the rows
        # Rows too short for ``position`` read a neighbour's byte here; ``valid`` already excludes them.
        return data.take(starts + position, mode="clip")

    def digit(position: int) -> np.ndarray:
        value = byte(position) - np.uint8(48)  # wraps around below '0', so one comparison checks both ends
        valid[value > 9] = False
        return value.astype(np.int32)

    hour, minute, second = (digit(at) * 10 + digit(at + 1) for at in (0, 3, 6))
    valid &= (byte(2) == ord(":")) & (byte(5) == ord(":")) & (hour <= 23) & (minute <= 59) & (second <= 59)
    fraction = np.zeros(count, dtype=np.int32)
    valid &= (lengths < 10) | (byte(8) == ord("."))
    for place in range(6):
        present = lengths > 9 + place
        if not present.any():
            break
        value = byte(9 + place) - np.uint8(48)
        valid &= ~present | (value <= 9)
        fraction += np.where(present, value, np.uint8(0)).astype(np.int32) * 10 ** (5 - place)
    micros = ((hour * 60 + minute) * 60 + second).astype(np.int64) * 1_000_000 + fraction
    return np.where(valid, micros, 0), valid


def micros_of_day(clock: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds since midnight, valid) of HH:MM:SS[.ffffff] texts (the general path's time check)."""
    parts = [_clock_micros(chunk) for chunk in clock.chunks]
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate([micros for micros, _ in parts]), np.concatenate([valid for _, valid in parts])


def positive_decimals(values: pl.Series, pattern: str) -> tuple[np.ndarray, pa.Array]:
    """(passes the general path's checks, decimal(18, 8) value) per distinct text."""
    ok = (values.str.contains(pattern) & values.str.contains("[1-9]")).fill_null(False)
    decimals = pl.select(pl.when(ok).then(values.cast(pl.Decimal(18, 8), strict=False))).to_series()
    # Texts that fail are 0 here, never null: no kept row points at them, and the values become the
    # dictionary of a required column.
    return ok.to_numpy(), decimals.fill_null(0).to_arrow().cast(pa.decimal128(18, 8))
