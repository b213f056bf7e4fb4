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
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from k2_resources.asx.files import RAW_SCHEMA, TRADE_FIELDS, _require_dir, company_symbols, source_files
from k2_resources.asx.normalise import (
    _DATE,
    _DECIMAL,
    _TRADE_COLUMNS,
    _WHOLE,
    ASSET_CLASS,
    CURRENCY,
    DEAD_LETTER_SOURCE,
    EXCHANGE,
    NormalisedDay,
    _dead_letters,
    _general_trades,
    _trade_rows,
)
from k2_resources.asx.sydney_time import _utc_offset
from k2_resources.catalog.tables import TRADES

_NO_DAY = np.iinfo(np.int32).min
_EPOCH = date(1970, 1, 1)
_DICTIONARY = pa.dictionary(pa.int32(), pa.string())
_COLUMN_TYPES = {name: (pa.string() if name == "time" else _DICTIONARY) for name in TRADE_FIELDS}
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


def _dictionary(indices: np.ndarray, values: pa.Array) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(
        pa.array(indices.astype(np.int32, copy=False)), values.cast(pa.large_string())
    )


def _repeated(text: str, zeros: pa.Array) -> pa.DictionaryArray:
    """``text`` on every row: ``zeros`` (int32 indices, shared by every such column) into [text]."""
    return pa.DictionaryArray.from_arrays(zeros, pa.array([text], type=pa.large_string()))


@dataclass
class _Scan:
    """One part of a file: its lines, which are well formed, their parsed fields, and each line's day."""

    path: Path
    first_line: int  # 0-based index in the file of the part's first line
    well: np.ndarray  # 0-based indices (in the part) of the 7-field lines, in order (the rows of ``fields``)
    bad: np.ndarray  # 0-based indices (in the part) of the other lines (other widths, empty)
    bad_text: list[str]  # their texts
    fields: pa.Table
    line_day: np.ndarray  # days since 1970 per line (its own date, else its neighbours'), _NO_DAY if none


def _dictionary_parts(column: pa.ChunkedArray) -> tuple[pl.Series, np.ndarray]:
    """(distinct values, index of each row's value) of a dictionary column with unified dictionaries."""
    chunks = [chunk for chunk in column.chunks if len(chunk)]
    if not chunks:
        return pl.Series([], dtype=pl.String), np.zeros(0, dtype=np.int32)
    values = pl.Series(chunks[0].dictionary.cast(pa.large_string()))
    indices = np.concatenate([chunk.indices.to_numpy(zero_copy_only=False) for chunk in chunks])
    return values, indices


def _days(texts: pl.Series) -> np.ndarray:
    """Days since 1970 of MM/DD/YYYY texts, _NO_DAY where the text is not such a date."""
    parsed = pl.select(
        pl.when(texts.str.contains(_DATE)).then(texts.str.strptime(pl.Date, "%m/%d/%Y", strict=False))
    ).to_series()
    return parsed.cast(pl.Int32).fill_null(_NO_DAY).to_numpy().astype(np.int32)


# More lines of the wrong width than this in one part: the day takes the general path.
_MAX_SKIPPED_LINES = 10_000


def _line_starts_of(data: bytes, text: bytes, start: int, end: int) -> list[int]:
    """Byte offsets of every line in ``data[start:end]`` (whole lines) whose content (without its LF
    or CRLF) is exactly ``text``."""

    def ends_a_line(at: int) -> bool:
        return at == len(data) or data.startswith(b"\n", at) or data.startswith(b"\r\n", at)

    if not text:  # empty lines: one search per line end
        ends = (b"\n", b"\r\n") if b"\r" in data else (b"\n",)
        found = [start] if start < end and any(data.startswith(line_end, start) for line_end in ends) else []
        for line_end in ends:
            at = data.find(b"\n" + line_end, start, end)
            while at >= 0:
                found.append(at + 1)
                at = data.find(b"\n" + line_end, at + 1, end)
        return sorted(found)
    found = [start] if data.startswith(text, start) and ends_a_line(start + len(text)) else []
    needle = b"\n" + text  # one pass over the part: where the text starts a line, then what follows it
    at = data.find(needle, start, end)
    while at >= 0:
        if ends_a_line(at + len(needle)):
            found.append(at + 1)
        at = data.find(needle, at + 1, end)
    return found


def _searched(data: bytes, start: int, end: int, wanted: Counter[bytes]) -> list[tuple[int, bytes]] | None:
    """Each wanted line found by a search of the part for its text (20 ms per text per 48 MB)."""
    located: list[tuple[int, bytes]] = []
    for text, count in wanted.items():
        starts = _line_starts_of(data, text, start, end)
        if len(starts) != count:
            return None
        located += [(at, text) for at in starts]
    located.sort()
    found, line, previous = [], 0, start
    for at, text in located:
        line += data.count(b"\n", previous, at)
        previous = at
        found.append((line, text))
    return found


def _compared(
    data: bytes, start: int, end: int, line_count: int, wanted: Counter[bytes]
) -> list[tuple[int, bytes]] | None:
    """Each wanted line found among the part's lines of its length, all compared at once (about
    80 ms per 48 MB, whatever the number of texts)."""
    view = np.frombuffer(data, dtype=np.uint8)[start:end]
    line_feeds = np.flatnonzero(view == 10)
    starts = np.concatenate([np.zeros(1, dtype=np.int64), line_feeds + 1])[:line_count]
    ends = np.concatenate([line_feeds, np.array([len(view)], dtype=np.int64)])[:line_count]
    ends -= (ends > starts) & (view[np.maximum(ends - 1, 0)] == 13)  # a CRLF ends the line too
    lengths = ends - starts
    by_length: dict[int, list[bytes]] = {}
    for text in wanted:
        by_length.setdefault(len(text), []).append(text)
    found: list[tuple[int, bytes]] = []
    for length, texts in by_length.items():
        candidates = np.flatnonzero(lengths == length)
        if length:
            # Each candidate line as one fixed-width numpy byte string; equal-length ones compare
            # exactly. The texts of the matches are then read from the bytes (numpy drops
            # trailing NULs when it gives an "S" value back).
            targets = np.array(texts, dtype=f"S{length}")
            rows = max(1, (4 << 20) // length)  # candidates per grid: its byte offsets stay under 32 MB
            candidates = np.concatenate(
                [
                    chunk[np.isin(view[starts[chunk][:, None] + np.arange(length)].view(f"S{length}").ravel(), targets)]
                    for chunk in np.array_split(candidates, max(1, -(-len(candidates) // rows)))
                ]
            )
        if len(candidates) != sum(wanted[text] for text in texts):
            return None
        found += [
            (line, data[start + at : start + at + length])
            for line, at in zip(candidates.tolist(), starts[candidates].tolist())
        ]
    return found if Counter(text for _, text in found) == wanted else None


# Up to this many distinct texts, the skipped lines are searched for one text at a time; more
# are compared all at once (a hostile feed's thousands of distinct bad lines took 54 s searched
# one by one in a 10M-row day, 5.8 s compared).
_SEARCHED_TEXTS = 4


def _skipped_lines(
    data: bytes, start: int, end: int, line_count: int, skipped: list[str], empty_lines: int
) -> tuple[np.ndarray, list[str]] | None:
    """(0-based line indices in the part, texts) of the lines of ``data[start:end]`` (``line_count``
    whole lines) the CSV reader skipped: those it handed to the invalid-row handler (``skipped``,
    other widths) and ``empty_lines`` empty ones. The reader gives no line numbers when it reads
    in parallel, so each is found by its text; None when the lines found do not match the
    reader's counts exactly."""
    wanted = Counter(text.encode("utf-8") for text in skipped)
    if empty_lines:
        wanted[b""] = empty_lines
    if len(wanted) <= _SEARCHED_TEXTS:
        found = _searched(data, start, end, wanted)
    else:
        found = _compared(data, start, end, line_count, wanted)
    if found is None:
        return None
    found.sort()
    return np.array([line for line, _ in found], dtype=np.int64), [text.decode("utf-8") for _, text in found]


# A file is read in parts of about this many bytes (cut at line ends): the arrays of a part fit
# the allocator's reused memory and the CPU caches, where a whole 200 MB file's arrays are fresh
# pages on every pass (half the normalise time went to page faults), and two threads share the
# parts of one large file.
_PART_BYTES = 48 << 20
# Looking back this many lines from a part's start for the day its leading undated lines take.
_MAX_LOOK_BACK = 1_000
_DATED_LINE = re.compile(rb"[0-9]{2}/[0-9]{2}/[0-9]{4}(,|$)")


@dataclass
class _Part:
    """Whole lines ``data[start:end]`` of a file: the ``line_count`` lines from ``first_line``."""

    start: int
    end: int
    first_line: int
    line_count: int
    previous_day: int  # the day of the last dated line before the part, _NO_DAY if none


@dataclass
class _File:
    """A trade file's bytes, checked to be readable column-wise, and its parts."""

    path: Path
    data: bytes
    parts: list[_Part]


def _day_before(data: bytes, at: int) -> int | None:
    """The day of the last dated line ending before byte ``at`` (a line start); _NO_DAY when no
    line before it is dated; None when that is more than _MAX_LOOK_BACK lines back."""
    end = at
    for _ in range(_MAX_LOOK_BACK):
        if end <= 0:
            return _NO_DAY
        start = data.rfind(b"\n", 0, end - 1) + 1
        line = data[start : end - 1].removesuffix(b"\r")
        if _DATED_LINE.match(line):
            day = int(_days(pl.Series([line[:10].decode("ascii")], dtype=pl.String))[0])
            if day != _NO_DAY:
                return day
        end = start
    return None


@dataclass(frozen=True)
class _ByteCounts:
    """What one pass over a range of a file's bytes found."""

    line_feeds: int
    bare_carriage_return: bool  # a CR not followed by LF: the CSV reader would end a line there
    non_ascii: bool


def _count_bytes(data: bytes, start: int, end: int, block: int = 256 << 10) -> _ByteCounts:
    """The LFs in ``data[start:end]``, and whether a CR there is bare or a byte is not ASCII.

    One numpy pass in blocks small enough to stay in cache, with the GIL released while it
    compares, so two files are checked at once (``bytes.count`` and friends hold the GIL: three
    of them over a 200 MB file took 0.45 s, this pass 0.11 s)."""
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


def _prepare(path: Path, part_bytes: int = _PART_BYTES) -> _File | None:
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
    counts = [_count_bytes(data, start, end) for start, end in zip(cuts, cuts[1:])]
    if any(count.bare_carriage_return for count in counts):
        return None  # a bare CR: the CSV reader would end a line where the general path does not
    if any(count.non_ascii for count in counts):
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    days_before = [_NO_DAY] + [_day_before(data, cut) for cut in cuts[1:-1]]
    if any(day is None for day in days_before):  # no dated line near a cut: one part
        cuts, days_before = [0, len(data)], [_NO_DAY]
        counts = [_ByteCounts(sum(count.line_feeds for count in counts), False, False)]
    parts, first_line = [], 0
    for start, end, day_before, count in zip(cuts, cuts[1:], days_before, counts):
        lines = count.line_feeds + (1 if end == len(data) and end > start and not data.endswith(b"\n") else 0)
        parts.append(_Part(start, end, first_line, lines, day_before))  # type: ignore[arg-type]
        first_line += lines
    return _File(path, data, parts)


def _scan(file: _File, part: _Part) -> _Scan | None:
    """One part's lines read column-wise; None when the day needs the general path."""
    data, line_count = file.data, part.line_count
    if line_count == 0:
        return _Scan(
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
    located = _skipped_lines(
        data, part.start, part.end, line_count, skipped, line_count - fields.num_rows - len(skipped)
    )
    if located is None:
        return None
    bad, bad_text = located
    well = np.arange(line_count, dtype=np.int64)
    if len(bad):
        well = np.delete(well, bad)
    fields = fields.unify_dictionaries()
    line_day = np.full(line_count, _NO_DAY, dtype=np.int32)
    date_values, date_index = _dictionary_parts(fields.column("date"))
    line_day[well] = _days(date_values)[date_index]
    if len(bad):
        raw = pl.Series(bad_text, dtype=pl.String)
        dated = raw.str.contains(r"^[0-9]{2}/[0-9]{2}/[0-9]{4}(,|$)")
        line_day[bad] = _days(pl.select(pl.when(dated).then(raw.str.slice(0, 10))).to_series())
    known = line_day != _NO_DAY
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
            filled[:leading] = part.previous_day if part.previous_day != _NO_DAY else line_day[leading]
            line_day = filled
    return _Scan(file.path, part.first_line, well, bad, bad_text, fields, line_day)


@functools.lru_cache(maxsize=64)
def _minute_offsets_us(day: date) -> tuple[np.ndarray, np.ndarray]:
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
    fraction counts as padded with zeros. A byte-level read costs a few passes over 10M rows
    where string slicing and casting cost seconds."""
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


def _micros_of_day(clock: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds since midnight, valid) of HH:MM:SS[.ffffff] texts (the general path's time check)."""
    parts = [_clock_micros(chunk) for chunk in clock.chunks]
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate([micros for micros, _ in parts]), np.concatenate([valid for _, valid in parts])


def _positive_decimals(values: pl.Series, pattern: str) -> tuple[np.ndarray, pa.Array]:
    """(passes the general path's checks, decimal(18, 8) value) per distinct text."""
    ok = (values.str.contains(pattern) & values.str.contains("[1-9]")).fill_null(False)
    decimals = pl.select(pl.when(ok).then(values.cast(pl.Decimal(18, 8), strict=False))).to_series()
    # Texts that fail are 0 here, never null: no kept row points at them, and the values become the
    # dictionary of a required column.
    return ok.to_numpy(), decimals.fill_null(0).to_arrow().cast(pa.decimal128(18, 8))


def _non_empty(values: pl.Series) -> np.ndarray:
    return (values.str.len_bytes() > 0).to_numpy()


def _vendor_data(company_id: str, fields: dict[str, tuple[pl.Series, np.ndarray]]) -> pa.Array:
    """vendor_data per row: company_id and qualifier_code always, venue and field_7 when not empty,
    in that order; keys and values are index arrays into the distinct texts."""
    qualifiers, qualifier_index = fields["qualifier"]
    venues, venue_index = fields["venue"]
    sevenths, seventh_index = fields["field_7"]
    rows = len(qualifier_index)
    venue_base, seventh_base = 1 + len(qualifiers), 1 + len(qualifiers) + len(venues)
    # Every row has company_id and qualifier_code: a row-major grid of two cells per row. A venue
    # or a 7th field is rare (224 and 113 of the 200,545 real trades of March 2014), so they are
    # inserted after their row's two cells in one pass, venue first.
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
        _dictionary(key_index, pa.array(list(_VENDOR_KEYS))),
        _dictionary(value_index, distinct),
        type=ENCODED_SCHEMA.field("vendor_data").type,
    )


# More runs of equal-width numbers than this: the ids are joined by pyarrow instead.
_MAX_WIDTH_RUNS = 64


def _prefixed(prefix: str, numbers: pa.LargeStringArray) -> pa.Array:
    """``prefix`` + each of ``numbers`` (decimal texts), as one large_string array.

    Line numbers in time order rise, so their texts come in a few runs of one width; each run is
    a grid of fixed-width rows, filled with the prefix and then the digits in two copies (a
    third of pyarrow's ``binary_join_element_wise`` time on 5M rows)."""
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


def _file_day(
    scan: _Scan, selected: np.ndarray, day: date, company_id: str, symbol: str, ingested_at: datetime
) -> tuple[pa.Table, pl.DataFrame]:
    """The V2 rows (in time order) and the rejected lines (with ``_reason``) of one file's day."""
    rows_selected = selected[scan.well]
    take = None if rows_selected.all() else np.flatnonzero(rows_selected)
    fields: dict[str, tuple[pl.Series, np.ndarray]] = {}
    for name in ("date", "price", "volume", "qualifier", "venue", "field_7"):
        values, index = _dictionary_parts(scan.fields.column(name))
        fields[name] = (values, index if take is None else index[take])
    clock = scan.fields.column("time")
    line_index = scan.well if take is None else scan.well[take]
    micros, time_ok = _micros_of_day(clock)
    if take is not None:
        micros, time_ok = micros[take], time_ok[take]
    offsets, offset_ok = _minute_offsets_us(day)
    minute = np.where(time_ok, micros // 60_000_000, 0)
    price_ok, prices = _positive_decimals(fields["price"][0], _DECIMAL)
    volume_ok, volumes = _positive_decimals(fields["volume"][0], _WHOLE)
    qualifier_ok = fields["qualifier"][0].str.contains(r"^[0-9]{1,4}$").fill_null(False).to_numpy()
    date_ok = _days(fields["date"][0]) != _NO_DAY
    ok = (
        time_ok
        & offset_ok[minute]
        & date_ok[fields["date"][1]]
        & price_ok[fields["price"][1]]
        & volume_ok[fields["volume"][1]]
        & qualifier_ok[fields["qualifier"][1]]
    )
    # Everything not accepted above is checked field by field, with its reason. A 7-field line
    # without quotes is its fields joined by commas, so its text is rebuilt from them.
    failed = np.flatnonzero(~ok)
    failed_rows = failed if take is None else take[failed]
    texts = {"time": pl.Series(clock.take(pa.array(failed_rows)).cast(pa.large_string()), dtype=pl.String)} | {
        name: values.gather(index[failed]) for name, (values, index) in fields.items()
    }
    del clock
    rebuilt = pl.select(pl.concat_str([pl.lit(texts[name]) for name in TRADE_FIELDS], separator=",")).to_series()
    in_day = selected[scan.bad]
    others = pl.DataFrame(
        {
            "line_number": np.concatenate([scan.bad[in_day], line_index[failed]]) + scan.first_line + 1,
            "raw": pl.concat(
                [
                    pl.Series([text for text, keep in zip(scan.bad_text, in_day) if keep], dtype=pl.String),
                    rebuilt.cast(pl.String),
                ]
            ),
        }
    ).sort("line_number")
    general = _general_trades(
        others.select(
            pl.lit(str(scan.path)).alias("file"),
            pl.col("line_number").cast(pl.Int64),
            pl.lit(company_id).alias("company_id"),
            pl.lit(symbol, dtype=pl.String).alias("symbol"),
            pl.col("raw"),
        )
    )
    if not ok.all():
        keep = np.flatnonzero(ok)
        fields = {name: (values, index[keep]) for name, (values, index) in fields.items()}
        line_index, micros, minute = line_index[keep], micros[keep], minute[keep]
    day_us = (day - _EPOCH).days * 86_400_000_000
    utc = day_us + micros - offsets[minute]
    line_number = line_index.astype(np.int64) + scan.first_line + 1
    if len(utc) > 1 and not bool(np.all(np.diff(utc) >= 0)):
        order = np.lexsort((line_number, utc))
        fields = {name: (values, index[order]) for name, (values, index) in fields.items()}
        utc, line_number = utc[order], line_number[order]
    count = len(utc)
    compact = day.strftime("%Y%m%d")
    numbers = pc.cast(pa.array(line_number), pa.large_string())
    schema = ENCODED_SCHEMA
    qualifiers = _dictionary(fields["qualifier"][1], fields["qualifier"][0].to_arrow())
    when = pa.scalar(ingested_at.astimezone(UTC), type=pa.timestamp("us", tz="UTC"))
    zeros = pa.array(np.zeros(count, dtype=np.int32))
    columns = {
        "message_id": _prefixed(f"asx:trade:{symbol}:{compact}:", numbers),
        "trade_id": _prefixed(f"{EXCHANGE}-{symbol}-{compact}-", numbers),
        "symbol": _repeated(symbol, zeros),
        "exchange": _repeated(EXCHANGE, zeros),
        "asset_class": _repeated(ASSET_CLASS, zeros),
        "timestamp": pa.array(utc, type=pa.timestamp("us", tz="UTC")),
        "price": pa.DictionaryArray.from_arrays(pa.array(fields["price"][1].astype(np.int32, copy=False)), prices),
        "quantity": pa.DictionaryArray.from_arrays(pa.array(fields["volume"][1].astype(np.int32, copy=False)), volumes),
        "currency": _repeated(CURRENCY, zeros),
        "side": _repeated("UNKNOWN", zeros),
        "trade_conditions": pa.LargeListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int64)), qualifiers, type=schema.field("trade_conditions").type
        ),
        "source_sequence": pa.array(line_number),
        "ingestion_timestamp": pa.repeat(when, count),
        "platform_sequence": pa.nulls(count, pa.int64()),
        "vendor_data": _vendor_data(company_id, fields),
    }
    table = pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)
    accepted = general.filter(pl.col("_reason").is_null())
    if accepted.height:  # lines only the general path accepts: rare, so these rows are decoded
        table = pa.concat_tables(
            [table.cast(TRADES.arrow_schema()), _trade_rows(accepted.select(_TRADE_COLUMNS), ingested_at)]
        )
        table = table.sort_by([("timestamp", "ascending"), ("source_sequence", "ascending")])
    return table, general.filter(pl.col("_reason").is_not_null())


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


class ColumnarDeclined(Exception):
    """A file of the day needs the general path (see the module doc)."""


def trade_file_days(
    data_dir: Path, partition_key: str, ingested_at: datetime | None = None, part_bytes: int = _PART_BYTES
) -> Iterator[FileDay]:
    """Each trade file's share of the day, part by part as soon as a part is read (two at a time),
    so a caller can write one part's rows while the next is read. Raises ColumnarDeclined when a
    file needs the general path; the parts already given are then not the whole day."""
    data_dir = _require_dir(data_dir)
    ingested_at = ingested_at or datetime.now(UTC)
    day = date.fromisoformat(partition_key)
    target = (day - _EPOCH).days
    symbols = company_symbols(data_dir)

    def prepared(path: Path) -> _File:
        file = _prepare(path, part_bytes) if symbols.get(path.stem) else None
        if file is None:
            raise ColumnarDeclined(f"{path.name} needs the general path")
        return file

    def one_part(file: _File, part: _Part) -> FileDay:
        scan = _scan(file, part)
        if scan is None or (len(scan.line_day) and (scan.line_day == _NO_DAY).all()):
            # needs the general path; lines without a single date: read_raw_day's fallback day decides
            raise ColumnarDeclined(f"{file.path.name} needs the general path")
        symbol = symbols[file.path.stem]
        selected = scan.line_day == target
        if not selected.any():
            return FileDay(
                file.path, part.first_line, symbol, 0, ENCODED_SCHEMA.empty_table(), _general_trades(_empty_raw())
            )
        rows, bad = _file_day(scan, selected, day, file.path.stem, symbol, ingested_at)
        return FileDay(file.path, part.first_line, symbol, int(selected.sum()), rows, bad)

    # Parts are independent and numpy, pyarrow and polars release the GIL: two at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        files = [pool.submit(prepared, path) for path in source_files(data_dir, "trades")]
        parts: list[Future[FileDay]] = []
        try:
            for done in as_completed(files):
                file = done.result()
                parts += [pool.submit(one_part, file, part) for part in file.parts]
            for done in as_completed(parts):
                yield done.result()
        finally:
            for future in files + parts:  # type: ignore[operator]
                future.cancel()


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
    data_dir: Path, partition_key: str, ingested_at: datetime | None = None, part_bytes: int = _PART_BYTES
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
