"""The ASX source files: reading the CSV lines of one trading day, as they are.

The source (``data/asx``, see its SOURCE.md) holds one trades file and one quotes file per
company (``trades/<company_id>.csv``, ``quotes/<company_id>.csv``, no header row, CRLF line
ends, exchange-local Australia/Sydney times), plus ``reference-data/company_info.csv`` that
maps company ids to symbols. A trading day is the set of rows dated that day in every file.
"""

from __future__ import annotations

import csv
import os
from datetime import date
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import pyarrow as pa

from k2_resources.errors import K2Error
from k2_resources.paths import DATA_DIR

Kind = Literal["trades", "quotes"]
KINDS: tuple[Kind, ...] = ("trades", "quotes")

# Column layouts as observed (SOURCE.md). The 7th trade field is documented as "buyer id" but
# carries a price-like value on 113 rows; it is kept verbatim in vendor_data.
TRADE_FIELDS = ("date", "time", "price", "volume", "qualifier", "venue", "field_7")
QUOTE_FIELDS = ("date", "time", "bid", "ask", "bid_volume", "ask_volume")
FIELDS: dict[Kind, tuple[str, ...]] = {"trades": TRADE_FIELDS, "quotes": QUOTE_FIELDS}

# The lines of one day as read (what read_raw_day returns and the normalisers take).
RAW_SCHEMA = pa.schema(
    [
        ("file", pa.large_string()),
        ("line_number", pa.int64()),
        ("company_id", pa.large_string()),
        ("symbol", pa.large_string()),
        ("raw", pa.large_string()),
    ]
)


def default_data_dir() -> Path:
    """``$K2_ASX_DATA_DIR`` or the copy of the ASX data in the project (``data/asx``)."""
    return Path(os.environ.get("K2_ASX_DATA_DIR") or DATA_DIR / "asx").expanduser().resolve()


def _require_dir(data_dir: Path) -> Path:
    if not (data_dir / "trades").is_dir() and not (data_dir / "quotes").is_dir():
        raise K2Error(
            f"no ASX data in {data_dir} (expected trades/ and quotes/ folders); "
            "set K2_ASX_DATA_DIR or the asx_source resource's data_dir to the folder holding them"
        )
    return data_dir


def company_symbols(data_dir: Path) -> dict[str, str]:
    """company_id -> symbol from ``reference-data/company_info.csv``."""
    path = data_dir / "reference-data" / "company_info.csv"
    if not path.is_file():
        raise K2Error(f"{path} is missing; it maps ASX company ids to symbols. Restore it from data/asx.")
    with path.open(newline="", encoding="utf-8") as handle:
        return {row["company_id"].strip(): row["symbol"].strip() for row in csv.DictReader(handle)}


def source_files(data_dir: Path, kind: Kind) -> list[Path]:
    """The CSV files of one kind, one per company, in company id order."""
    return sorted((data_dir / kind).glob("*.csv"))


def _read_lines(path: Path) -> pl.Series:
    """The lines of a file without their line ends (LF or CRLF); a final line end starts no new line.

    The file's bytes become one Arrow string array whose offsets are the line starts (found
    with numpy), so 10M lines cost no Python string each. Bytes that are not UTF-8 are
    replaced (U+FFFD), as a text decode with errors="replace" would.
    """
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        data = data.decode("utf-8", errors="replace").encode("utf-8")
    line_ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == ord("\n"))
    starts = np.concatenate([np.zeros(1, dtype=np.int64), line_ends.astype(np.int64) + 1])
    if starts[-1] == len(data):
        starts = starts[:-1]
    offsets = np.append(starts, np.int64(len(data)))
    lines = pa.LargeStringArray.from_buffers(len(starts), pa.py_buffer(offsets), pa.py_buffer(data))
    series = pl.Series("raw", lines, dtype=pl.String)
    return series.str.strip_suffix("\n").str.strip_suffix("\r")


def _dated_lines(path: Path) -> pl.DataFrame:
    """line_number, raw and the trading day each line belongs to.

    A line's day is its own date field when that parses; a line whose date does not parse
    belongs to the day of the line before it (files are in time order), or the line after
    it at the top of a file, so that it is dead-lettered with its neighbours, never lost.
    """
    frame = pl.DataFrame({"raw": _read_lines(path)}).with_row_index("line_number", offset=1)
    dated = pl.col("raw").str.contains(r"^[0-9]{2}/[0-9]{2}/[0-9]{4}(,|$)")
    day = pl.when(dated).then(pl.col("raw").str.slice(0, 10)).str.strptime(pl.Date, "%m/%d/%Y", strict=False)
    return frame.with_columns(day.forward_fill().backward_fill().alias("day"))


def trading_days(data_dir: Path | None = None) -> list[str]:
    """The trading days (ISO dates) present in the trades and quotes files, sorted."""
    data_dir = _require_dir(data_dir or default_data_dir())
    days: set[date] = set()
    for kind in KINDS:
        for path in source_files(data_dir, kind):
            days.update(d for d in _dated_lines(path)["day"].unique().to_list() if d is not None)
    return [d.isoformat() for d in sorted(days)]


def read_raw_day(data_dir: Path, kind: Kind, day: date | str) -> pa.Table:
    """Every line of one trading day from all companies' files of one kind, as read.

    Columns: file, line_number (1-based), company_id (the file name), symbol (null when the
    company id is not in company_info.csv), raw (the line without its line end).
    """
    data_dir = _require_dir(data_dir)
    day = date.fromisoformat(day) if isinstance(day, str) else day
    symbols = company_symbols(data_dir)
    dated = {path: _dated_lines(path) for path in source_files(data_dir, kind)}
    present = [d for lines in dated.values() for d in lines["day"].drop_nulls().unique().to_list()]
    # A file without a single valid date: its lines go to the first trading day, once.
    fallback = min(present) if present else date.fromisoformat(trading_days(data_dir)[0])
    frames = []
    for path, lines in dated.items():
        selected = lines.filter(pl.col("day").fill_null(fallback) == day)
        frames.append(
            selected.select(
                pl.lit(str(path)).alias("file"),
                pl.col("line_number").cast(pl.Int64),
                pl.lit(path.stem).alias("company_id"),
                pl.lit(symbols.get(path.stem), dtype=pl.String).alias("symbol"),
                pl.col("raw"),
            )
        )
    if not frames:
        return RAW_SCHEMA.empty_table()
    return pl.concat(frames).to_arrow().cast(RAW_SCHEMA)
