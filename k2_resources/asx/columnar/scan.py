"""Stage 3 of the column-wise trade reader: one part's lines read into columns, each line's day."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv

from k2_resources.asx.columnar.parts import NO_DAY, File, Part, day_numbers
from k2_resources.asx.columnar.skipped import skipped_lines
from k2_resources.asx.files import TRADE_FIELDS

_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
_COLUMN_TYPES = {name: (pa.string() if name == "time" else _DICTIONARY) for name in TRADE_FIELDS}
# More lines of the wrong width than this in one part: the day takes the general path.
_MAX_SKIPPED_LINES = 10_000


@dataclass
class Scan:
    """One part of a file: its lines, which are well formed, their parsed fields, and each line's day."""

    path: Path
    first_line: int  # 0-based index in the file of the part's first line
    well: np.ndarray  # 0-based indices (in the part) of the 7-field lines, in order (the rows of ``fields``)
    bad: np.ndarray  # 0-based indices (in the part) of the other lines (other widths, empty)
    bad_text: list[str]  # their texts
    fields: pa.Table
    line_day: np.ndarray  # days since 1970 per line (its own date, else its neighbours'), NO_DAY if none


def dictionary_parts(column: pa.ChunkedArray) -> tuple[pl.Series, np.ndarray]:
    """(distinct values, index of each row's value) of a dictionary column with unified dictionaries."""
    chunks = [chunk for chunk in column.chunks if len(chunk)]
    if not chunks:
        return pl.Series([], dtype=pl.String), np.zeros(0, dtype=np.int32)
    values = pl.Series(chunks[0].dictionary.cast(pa.large_string()))
    indices = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in chunks])
    return values, indices


def scan_part(file: File, part: Part) -> Scan | None:
    """One part's lines read column-wise; None when the day needs the general path."""
    data, line_count = file.data, part.line_count
    if line_count == 0:
        return Scan(
            file.path,
            part.first_line,
            np.zeros(0, dtype=np.int64),
            np.zeros(0, dtype=np.int64),
            [],
            pa.table({}),
            np.zeros(0, dtype=np.int32),
        )
    skipped: list[str] = []

    def skip(row: pacsv.InvalidRow) -> str:
        if len(skipped) > _MAX_SKIPPED_LINES:
            return "error"
        skipped.append(row.text)
        return "skip"

    try:
        fields = pacsv.read_csv(
            pa.BufferReader(pa.py_buffer(data).slice(part.start, part.end - part.start)),
            read_options=pacsv.ReadOptions(column_names=list(TRADE_FIELDS), block_size=16 << 20),
            parse_options=pacsv.ParseOptions(quote_char=False, invalid_row_handler=skip),
            convert_options=pacsv.ConvertOptions(
                column_types=_COLUMN_TYPES, strings_can_be_null=False, check_utf8=False
            ),
        )
    except pa.ArrowInvalid:
        return None  # more lines of the wrong width than _MAX_SKIPPED_LINES
    # The reader drops empty lines without a word: they are the lines not accounted for.
    located = skipped_lines(
        data, part.start, part.end, line_count, skipped, line_count - fields.num_rows - len(skipped)
    )
    if located is None:
        return None
    bad, bad_text = located
    well = np.arange(line_count, dtype=np.int64)
    if len(bad):
        well = np.delete(well, bad)
    fields = fields.unify_dictionaries()
    line_day = np.full(line_count, NO_DAY, dtype=np.int32)
    date_values, date_index = dictionary_parts(fields.column("date"))
    line_day[well] = day_numbers(date_values)[date_index]
    if len(bad):
        raw = pl.Series(bad_text, dtype=pl.String)
        dated = raw.str.contains(r"^[0-9]{2}/[0-9]{2}/[0-9]{4}(,|$)")
        line_day[bad] = day_numbers(pl.select(pl.when(dated).then(raw.str.slice(0, 10))).to_series())
    known = line_day != NO_DAY
    if not known.all():
        # An undated line belongs to the day of the line before it (in an earlier part, if it
        # leads its part), or of the line after it when no line before it is dated.
        if not known.any():
            line_day[:] = part.previous_day
        else:
            source = np.where(known, np.arange(len(line_day)), -1)
            np.maximum.accumulate(source, out=source)
            leading = int(np.argmax(known))
            filled = line_day[np.maximum(source, 0)]
            filled[:leading] = part.previous_day if part.previous_day != NO_DAY else line_day[leading]
            line_day = filled
    return Scan(file.path, part.first_line, well, bad, bad_text, fields, line_day)
