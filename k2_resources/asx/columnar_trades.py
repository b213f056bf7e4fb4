"""One ASX trading day of trade files, read column-wise: the fast path of a 10M-row day.

pyarrow's multithreaded CSV reader parses the well-formed lines (exactly 7 comma-separated
fields) into columns, dictionary-encoded where values repeat (date, price, volume, qualifier,
venue, 7th field), so their checks and conversions run once per distinct value. One numpy
pass over each part's bytes counts its lines and finds bare CRs and non-ASCII bytes; the lines
the reader skips (another width, empty) are found by their texts, which gives the exact line
number of every parsed row and of every skipped line. Any line the vectorised
checks do not accept, and every line of another width, goes through the general path of
:mod:`k2_resources.asx.normalise` (field by field, with the reason), so the rows and dead
letters are exactly those of :func:`~k2_resources.asx.normalise.normalise_trades` on
:func:`~k2_resources.asx.files.read_raw_day` (tests/unit/test_asx_columnar_trades.py holds
the two to each other). A file this path cannot read exactly (quotes, a bare CR, bytes that
are not UTF-8, a company without a symbol) makes it return None, and the caller takes the
general path for the day.

This module drives the stages in :mod:`k2_resources.asx.columnar`: ``parts`` (a file's bytes
checked and cut into parts), ``skipped`` (the lines the reader skipped, found by their texts),
``scan`` (a part read into columns, each line's day), ``fields`` (the field checks, vectorised),
``columns`` (ids, vendor data, encoded columns) and ``file_day`` (a part's V2 rows and
rejected lines).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa

from k2_resources.asx.columnar.columns import ENCODED_SCHEMA
from k2_resources.asx.columnar.file_day import file_day_rows
from k2_resources.asx.columnar.parts import EPOCH, NO_DAY, PART_BYTES, File, Part, prepare
from k2_resources.asx.columnar.scan import scan_part
from k2_resources.asx.errors import ColumnarDeclined
from k2_resources.asx.files import RAW_SCHEMA, _require_dir, company_symbols, source_files
from k2_resources.asx.normalise import DEAD_LETTER_SOURCE, NormalisedDay, _dead_letters, _general_trades
from k2_resources.catalog.tables import TRADES

# writes.py takes these from here with the reader's entry points.
__all__ = [
    "ENCODED_SCHEMA",
    "ColumnarDeclined",
    "FileDay",
    "assemble_day",
    "normalise_trade_files",
    "trade_file_days",
]


def _empty_raw() -> pl.DataFrame:
    frame = pl.from_arrow(RAW_SCHEMA.empty_table())
    assert isinstance(frame, pl.DataFrame)
    return frame


@dataclass
class FileDay:
    """One part of a trade file's share of a day: its lines of the day, V2 rows (time order) and
    rejected lines."""

    path: Path
    first_line: int  # where the part starts in the file (0-based line index)
    symbol: str
    lines_of_day: int
    rows: pa.Table
    rejected: pl.DataFrame


def trade_file_days(
    data_dir: Path, partition_key: str, ingested_at: datetime | None = None, part_bytes: int = PART_BYTES
) -> Iterator[FileDay]:
    """Each trade file's share of the day, part by part as soon as a part is read (two at a time),
    so a caller can write one part's rows while the next is read. Raises ColumnarDeclined when a
    file needs the general path; the parts already given are then not the whole day."""
    data_dir = _require_dir(data_dir)
    ingested_at = ingested_at or datetime.now(UTC)
    day = date.fromisoformat(partition_key)
    target = (day - EPOCH).days
    symbols = company_symbols(data_dir)

    def prepared(path: Path) -> File:
        file = prepare(path, part_bytes) if symbols.get(path.stem) else None
        if file is None:
            raise ColumnarDeclined(f"{path.name} needs the general path")
        return file

    def one_part(file: File, part: Part) -> FileDay:
        scan = scan_part(file, part)
        if scan is None or (len(scan.line_day) and (scan.line_day == NO_DAY).all()):
            # needs the general path; lines without a single date: read_raw_day's fallback day decides
            raise ColumnarDeclined(f"{file.path.name} needs the general path")
        symbol = symbols[file.path.stem]
        selected = scan.line_day == target
        if not selected.any():
            return FileDay(
                file.path, part.first_line, symbol, 0, ENCODED_SCHEMA.empty_table(), _general_trades(_empty_raw())
            )
        rows, bad = file_day_rows(scan, selected, day, file.path.stem, symbol, ingested_at)
        return FileDay(file.path, part.first_line, symbol, int(selected.sum()), rows, bad)

    # Parts are independent and numpy, pyarrow and polars release the GIL: two at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        files = [pool.submit(prepared, path) for path in source_files(data_dir, "trades")]
        parts: list[Future[FileDay]] = []
        try:
            for file_read in as_completed(files):
                file = file_read.result()
                parts += [pool.submit(one_part, file, part) for part in file.parts]
            for part_read in as_completed(parts):
                yield part_read.result()
        finally:
            for future in files:
                future.cancel()
            for part_future in parts:
                part_future.cancel()


def _in_order(tables: list[pa.Table]) -> bool:
    """Whether tables each in (timestamp, source_sequence) order are also in order one after another."""
    keys = [
        (table["timestamp"][index].value, table["source_sequence"][index].as_py())
        for table in tables
        if table.num_rows
        for index in (0, table.num_rows - 1)
    ]
    return all(earlier <= later for earlier, later in zip(keys, keys[1:]))


def assemble_day(file_days: list[FileDay], partition_key: str, ingested_at: datetime) -> NormalisedDay:
    """The day's V2 rows (by symbol, then time) and dead letters (by file and line) from its parts."""
    # Rows the general path accepted come decoded (see _file_day); then every part's rows are.
    decode = len({file_day.rows.schema for file_day in file_days if file_day.rows.num_rows}) > 1
    by_symbol: dict[str, list[pa.Table]] = {}
    for file_day in sorted(file_days, key=lambda file_day: (file_day.path, file_day.first_line)):
        if file_day.rows.num_rows:
            rows = file_day.rows.cast(TRADES.arrow_schema()) if decode else file_day.rows
            by_symbol.setdefault(file_day.symbol, []).append(rows)
    ordered: list[pa.Table] = []
    for symbol in sorted(by_symbol):
        tables = by_symbol[symbol]
        if _in_order(tables):  # one file's parts, in time order: they follow each other
            ordered.extend(tables)
        else:  # two files of one symbol, or lines out of time order across parts: merge in time order
            ordered.append(
                pa.concat_tables(tables).sort_by([("timestamp", "ascending"), ("source_sequence", "ascending")])
            )
    table = pa.concat_tables(ordered) if ordered else ENCODED_SCHEMA.empty_table()
    rejected = [file_day.rejected for file_day in file_days]
    dead = pl.concat(rejected) if rejected else _general_trades(_empty_raw())
    dead = dead.sort(["file", "line_number"])
    return NormalisedDay(table, _dead_letters(dead, DEAD_LETTER_SOURCE["trades"], partition_key, ingested_at))


def normalise_trade_files(
    data_dir: Path, partition_key: str, ingested_at: datetime | None = None, part_bytes: int = PART_BYTES
) -> tuple[int, NormalisedDay] | None:
    """(lines of the day, its V2 rows and dead letters) straight from the trade files, as
    ``normalise_trades(read_raw_day(data_dir, "trades", day), day)`` gives them; None when a file
    needs the general path (see the module doc)."""
    ingested_at = ingested_at or datetime.now(UTC)
    try:
        file_days = list(trade_file_days(data_dir, partition_key, ingested_at, part_bytes))
    except ColumnarDeclined:
        return None
    return sum(file_day.lines_of_day for file_day in file_days), assemble_day(file_days, partition_key, ingested_at)
