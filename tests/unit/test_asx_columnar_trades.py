"""The column-wise trade reader (k2_resources.asx.columnar_trades and its stages in
k2_resources.asx.columnar) gives exactly the rows and dead
letters of the line-by-line path (normalise_trades on read_raw_day), or declines (None) and lets
the line-by-line path run: on generated days with every kind of malformed line, and on files of
hostile lines (wrong widths, duplicates, empty lines, undated lines between days, quotes, CRs)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from k2_resources.asx.columnar.columns import ENCODED_SCHEMA, prefixed
from k2_resources.asx.columnar.fields import micros_of_day
from k2_resources.asx.columnar.parts import count_bytes
from k2_resources.asx.columnar_trades import normalise_trade_files
from k2_resources.asx.files import read_raw_day, trading_days
from k2_resources.asx.normalise import _TIME, NormalisedDay, normalise_trades
from tests.support.asx_generator import write_asx_trades_day

INGESTED_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def _line_by_line(data_dir: Path, day: str) -> tuple[int, NormalisedDay]:
    raw = read_raw_day(data_dir, "trades", day)
    return raw.num_rows, normalise_trades(raw, day, INGESTED_AT)


def _assert_same(data_dir: Path, day: str, part_bytes: int | None = None) -> NormalisedDay | None:
    """The two paths agree on ``day``; the column-wise result, or None when it declined."""
    columnar = normalise_trade_files(data_dir, day, INGESTED_AT, **({"part_bytes": part_bytes} if part_bytes else {}))
    if columnar is None:
        return None
    lines, expected = _line_by_line(data_dir, day)
    assert columnar[0] == lines
    assert columnar[1].rows.schema in (expected.rows.schema, ENCODED_SCHEMA)  # V2 rows, maybe dictionary-encoded
    assert columnar[1].rows.cast(expected.rows.schema).equals(expected.rows)
    assert columnar[1].dead_letters.to_pylist() == expected.dead_letters.to_pylist()
    return columnar[1]


def test_a_generated_day_with_every_kind_of_malformed_line(tmp_path: Path) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=20_000)
    result = _assert_same(generated.data_dir, generated.day.isoformat())
    assert _assert_same(generated.data_dir, generated.day.isoformat(), part_bytes=50_000) is not None
    assert result is not None, "the column-wise path must take a well-formed day"
    assert result.valid == generated.rows - generated.malformed
    assert result.dead_letters.column("line_number").to_pylist() == list(generated.malformed_line_numbers)
    assert all(result.dead_letters.column("reason").to_pylist())


def test_it_declines_files_it_cannot_split_exactly(tmp_path: Path) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=2_000, malformed=0)
    path = generated.data_dir / "trades" / "7458.csv"
    path.write_bytes(path.read_bytes() + b'03/11/2014,10:00:00.000,"61.5",100,0,,\r\n')
    assert normalise_trade_files(generated.data_dir, generated.day.isoformat(), INGESTED_AT) is None


def test_thousands_of_distinct_bad_lines_each_at_its_line(tmp_path: Path) -> None:
    """A hostile feed: many distinct lines of the wrong width spread through a file, some of the
    same length as the good lines around them, some ending in NUL bytes, and empty lines."""
    generated = write_asx_trades_day(tmp_path / "asx", rows=20_000, malformed=0)
    path = generated.data_dir / "trades" / "7458.csv"
    lines = path.read_bytes().split(b"\r\n")
    date = generated.day.strftime("%m/%d/%Y").encode()
    bad = [date + b",10:%02d:%02d.000,61.5,%d" % (i // 60 % 60, i % 60, i) for i in range(2_500)]  # 4 fields
    bad += [date + b",10:00:00.000,61.5,100,0,,,%d" % i for i in range(400)]  # 8 fields
    bad += [b"x" * (i % 7) + b"\x00" * (1 + i % 3) for i in range(60)] + [b""] * 40
    for offset, line in enumerate(bad):  # spread through the file, after its first (dated) line
        lines.insert(1 + (offset * 7) % (len(lines) - 2), line)
    path.write_bytes(b"\r\n".join(lines))
    for part_bytes in (None, 50_000):
        result = _assert_same(generated.data_dir, generated.day.isoformat(), part_bytes)
        assert result is not None
        assert result.rejected == len(bad)  # each bad line a dead letter, with its line number (above)


@pytest.mark.parametrize(
    "tail",
    [
        b"03/11/2014,10:00:00.000,61.5,100,0,\r,\r\n",  # a bare CR inside a line
        b"03/11/2014,10:00:00.000,61.5,100,0,,\r",  # a CR ending the file
        b"03/11/2014,10:00:00.000,61.5,100,0,\xe9,\r\n",
    ],
)  # Latin-1, not UTF-8
def test_it_declines_bare_carriage_returns_and_bytes_that_are_not_utf8(tmp_path: Path, tail: bytes) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=20_000, malformed=0)
    path = generated.data_dir / "trades" / "7458.csv"
    path.write_bytes(path.read_bytes() + tail)
    # In parts too: the byte checks run part by part.
    for part_bytes in ({}, {"part_bytes": 50_000}):
        assert normalise_trade_files(generated.data_dir, generated.day.isoformat(), INGESTED_AT, **part_bytes) is None


@settings(max_examples=300, deadline=None, database=None)
@given(
    data=st.binary(max_size=200).map(lambda raw: raw.replace(b"\x00", b"\n").replace(b"\x01", b"\r")),
    cut=st.integers(0, 200),
    block=st.integers(1, 64),
)
def test_the_byte_pass_counts_line_feeds_and_finds_bare_carriage_returns(data: bytes, cut: int, block: int) -> None:
    """Against bytes' own methods, on any range of any bytes, in blocks of any size."""
    start, end = sorted((min(cut, len(data)), len(data) - min(cut, len(data)) // 2))
    counts = count_bytes(data, start, end, block=block)
    assert counts.line_feeds == data.count(b"\n", start, end)
    # A CR in the range is bare when the byte after it (in the range or not) is not LF.
    assert counts.bare_carriage_return == any(
        data[at : at + 2] != b"\r\n" for at in range(start, end) if data[at] == 13
    )
    assert counts.non_ascii == (not data[start:end].isascii())


# A field: well formed, near misses, or anything without a line end.
FIELDS = [
    st.sampled_from(["03/10/2014", "03/11/2014", "03/11/2014", "02/30/2014", "3/11/2014", ""]),
    st.sampled_from(
        [
            "10:00:00.000",
            "10:00:01.5",
            "23:59:59",
            "24:00:00.000",
            "10:00",
            "1:00:00.000",
            "",
            "10:00:00.123456",
            "10:00:00.1234567",
            "10:00:00.",
            "10:60:00",
            "10:00:60.5",
            "10:0a:00.000",
            "10-00-00.000",
            "10:00:00.12a",
            "10:00:00,5",
            "١٠:00:00",
            "10:00:00.000 ",
        ]
    ),
    st.sampled_from(["36.5", "0.0", "0", "-1", "1e5", "12345678901.5", ".5", "36.50000001", "abc"]),
    st.sampled_from(["100", "0", "-100", "1.5", "12345678901", "7"]),
    st.sampled_from(["0", "25", "Q", "12345", ""]),
    st.sampled_from(["", "X"]),
    st.sampled_from(["", "36.49", "x y"]),
]
LINE = st.one_of(
    st.tuples(*FIELDS).map(",".join),
    st.tuples(*FIELDS).map(lambda fields: ",".join(fields[:3])),  # too few fields
    st.tuples(*FIELDS).map(lambda fields: ",".join(fields) + ",extra"),  # too many
    st.just(""),
    st.text(alphabet=st.characters(codec="utf-8", blacklist_characters='\n\r"'), max_size=30),
)


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    bhp=st.lists(LINE, min_size=1, max_size=30),
    rio=st.lists(LINE, max_size=10),
    crlf=st.booleans(),
    final_line_end=st.booleans(),
    duplicate=st.booleans(),
    part_bytes=st.sampled_from([None, 1, 30, 100, 400]),
)
def test_any_lines_give_the_same_rows_and_dead_letters(
    tmp_path_factory: pytest.TempPathFactory,
    bhp: list[str],
    rio: list[str],
    crlf: bool,
    final_line_end: bool,
    duplicate: bool,
    part_bytes: int | None,
) -> None:
    root = tmp_path_factory.mktemp("asx")
    (root / "reference-data").mkdir()
    (root / "reference-data" / "company_info.csv").write_text("company_id,symbol\n7078,BHP\n7458,RIO\n")
    (root / "trades").mkdir()
    end = "\r\n" if crlf else "\n"
    if duplicate:  # the same malformed line more than once: each is found at its own line
        bhp = bhp + bhp
    for company, lines in (("7078", bhp), ("7458", rio)):
        lines = ["03/11/2014,10:00:00.000,36.5,100,0,,", *lines]  # every real file has dated lines
        text = end.join(lines) + (end if final_line_end else "")
        (root / "trades" / f"{company}.csv").write_bytes(text.encode())
    for day in trading_days(root):
        # No quotes, no bare CR: the column-wise path applies, whole or in parts of ``part_bytes``
        # (a part's leading undated lines take the day of the dated first line or a later one).
        assert _assert_same(root, day, part_bytes) is not None


@settings(max_examples=200, deadline=None, database=None)
@given(
    texts=st.lists(
        st.one_of(
            st.from_regex(r"\A[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,7})?\Z"),
            st.text(alphabet="0123456789:. a", max_size=16),
        ),
        max_size=40,
    )
)
def test_the_byte_level_clock_reader_accepts_exactly_what_the_general_path_does(texts: list[str]) -> None:
    micros, valid = micros_of_day(pa.chunked_array([pa.array(texts, type=pa.string())], type=pa.string()))
    for text, value, accepted in zip(texts, micros, valid):
        shaped = re.fullmatch(_TIME, text) is not None
        hour, minute, second = (int(text[at : at + 2]) if shaped else 0 for at in (0, 3, 6))
        expected = shaped and hour <= 23 and minute <= 59 and second <= 59
        assert accepted == expected, text
        if expected:
            assert value == ((hour * 60 + minute) * 60 + second) * 1_000_000 + int(text[9:].ljust(6, "0") or 0), text


@settings(max_examples=100, deadline=None, database=None)
@given(
    numbers=st.lists(st.integers(min_value=0, max_value=10**12), max_size=200),
    in_order=st.booleans(),
    prefix=st.text(max_size=12),
)
def test_prefixed_ids_equal_pyarrows_join(numbers: list[int], in_order: bool, prefix: str) -> None:
    texts = pc.cast(pa.array(sorted(numbers) if in_order else numbers, type=pa.int64()), pa.large_string())
    expected = pc.binary_join_element_wise(
        pa.scalar(prefix, pa.large_string()), texts, pa.scalar("", pa.large_string())
    )
    assert prefixed(prefix, texts).equals(expected)
    assert prefixed(prefix, texts.slice(len(numbers) // 3)).equals(expected.slice(len(numbers) // 3))
