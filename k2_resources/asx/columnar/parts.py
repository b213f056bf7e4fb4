"""Stage 1 of the column-wise trade reader: a file's bytes checked and cut into parts.

A file is read whole, checked for what the CSV reader would split differently from the general
path (quotes, a bare CR, bytes that are not UTF-8), and cut at line ends into parts read
independently; each part knows the day of the last dated line before it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
import polars as pl

from k2_resources.asx.normalise import _DATE

NO_DAY = np.iinfo(np.int32).min
EPOCH = date(1970, 1, 1)


def day_numbers(texts: pl.Series) -> np.ndarray:
    """Days since 1970 of MM/DD/YYYY texts, NO_DAY where the text is not such a date."""
    parsed = pl.select(
        pl.when(texts.str.contains(_DATE)).then(texts.str.strptime(pl.Date, "%m/%d/%Y", strict=False))
    ).to_series()
    return parsed.cast(pl.Int32).fill_null(NO_DAY).to_numpy().astype(np.int32)


# A file is read in parts of about this many bytes (cut at line ends): the arrays of a part fit
# the allocator's reused memory and the CPU caches, where a whole large file's arrays are fresh
# pages on every pass (page faults then dominate), and two threads share the parts of one large
# file.
PART_BYTES = 48 << 20
# Looking back this many lines from a part's start for the day its leading undated lines take.
_MAX_LOOK_BACK = 1_000
_DATED_LINE = re.compile(rb"[0-9]{2}/[0-9]{2}/[0-9]{4}(,|$)")


@dataclass
class Part:
    """Whole lines ``data[start:end]`` of a file: the ``line_count`` lines from ``first_line``."""

    start: int
    end: int
    first_line: int
    line_count: int
    previous_day: int  # the day of the last dated line before the part, NO_DAY if none


@dataclass
class File:
    """A trade file's bytes, checked to be readable column-wise, and its parts."""

    path: Path
    data: bytes
    parts: list[Part]


def _day_before(data: bytes, at: int) -> int | None:
    """The day of the last dated line ending before byte ``at`` (a line start); NO_DAY when no
    line before it is dated; None when that is more than _MAX_LOOK_BACK lines back."""
    end = at
    for _ in range(_MAX_LOOK_BACK):
        if end <= 0:
            return NO_DAY
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = data[start : end - 1].removesuffix(b"\r")
        if _DATED_LINE.match(line):
            day = int(day_numbers(pl.Series([line[:10].decode("ascii")], dtype=pl.String))[0])
            if day != NO_DAY:
                return day
        end = start
    return None


@dataclass(frozen=True)
class _ByteCounts:
    """What one pass over a range of a file's bytes found."""

    line_feeds: int
    bare_carriage_return: bool  # a CR not followed by LF: the CSV reader would end a line there
    non_ascii: bool


def count_bytes(data: bytes, start: int, end: int, block: int = 256 << 10) -> _ByteCounts:
    """The LFs in ``data[start:end]``, and whether a CR there is bare or a byte is not ASCII.

    One numpy pass in blocks small enough to stay in cache, with the GIL released while it
    compares, so two files are checked at once (``bytes.count`` and friends hold the GIL, and
    three of them cost more than this one pass)."""
    view = np.frombuffer(data, dtype=np.uint8)
    line_feeds, bare, non_ascii = 0, False, False
    for at in range(start, end, block):
        body = view[at : min(at + block, end)]
        line_feeds += int(np.count_nonzero(body == 10))
        carriage_returns = body == 13
        returns = int(np.count_nonzero(carriage_returns))
        if returns and not bare:
            following = view[at + 1 : at + 1 + len(body)] == 10  # the byte after each byte (none after the file's last)
            bare = int(np.count_nonzero(carriage_returns[: len(following)] & following)) != returns
        non_ascii = non_ascii or int(body.max()) >= 128
    return _ByteCounts(line_feeds, bare, non_ascii)


def prepare(path: Path, part_bytes: int = PART_BYTES) -> File | None:
    """The file's bytes and parts; None when the CSV reader would not split it into the same lines
    as the general path (quotes, a bare CR) or it is not UTF-8."""
    data = path.read_bytes()
    if b'"' in data:  # memchr: the cheapest check first
        return None  # quotes: the CSV reader would split differently from the lines
    cuts = [0]  # each part at least part_bytes long, the last one up to 1.5 times that
    while cuts[-1] + part_bytes + part_bytes // 2 < len(data):
        cut = data.find(b"\n", cuts[-1] + part_bytes - 1) + 1
        if cut == 0 or cut >= len(data):
            break
        cuts.append(cut)
    cuts.append(len(data))
    counts = [count_bytes(data, start, end) for start, end in zip(cuts, cuts[1:])]
    if any(count.bare_carriage_return for count in counts):
        return None  # a bare CR: the CSV reader would end a line where the general path does not
    if any(count.non_ascii for count in counts):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    days_before = [NO_DAY] + [_day_before(data, cut) for cut in cuts[1:-1]]
    if any(day is None for day in days_before):  # no dated line near a cut: one part
        cuts, days_before = [0, len(data)], [NO_DAY]
        counts = [_ByteCounts(sum(count.line_feeds for count in counts), False, False)]
    parts, first_line = [], 0
    for start, end, day_before, count in zip(cuts, cuts[1:], days_before, counts):
        lines = count.line_feeds + (1 if end == len(data) and end > start and not data.endswith(b"\n") else 0)
        parts.append(Part(start, end, first_line, lines, day_before))  # type: ignore[arg-type]
        first_line += lines
    return File(path, data, parts)
