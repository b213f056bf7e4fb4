"""Property: any ASX trades CSV row ends as exactly one normalised row or exactly one dead letter.

Rows are generated from the layout of data/asx/SOURCE.md (date, time, price, volume,
qualifier, venue, 7th field), each field either well formed or hostile (any Unicode, signs,
exponents, too many digits, impossible dates and times, missing or extra fields), plus
arbitrary lines. An independent oracle (plain Python: re, datetime, zoneinfo) says which rows
are valid and what their values must be; the vectorised normaliser must agree exactly.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from k2_resources.asx.files import RAW_SCHEMA, read_raw_day, trading_days
from k2_resources.asx.normalise import check_against_model, normalise_trades
from k2_resources.catalog.tables import TRADES

SYDNEY = ZoneInfo("Australia/Sydney")
SYMBOLS = {"7078": "BHP", "7458": "RIO"}
PROPERTY = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- generated fields: well formed, near misses, and anything --------------------------------------

no_separator = st.text(alphabet=st.characters(codec="utf-8", blacklist_characters=",\n\r"), max_size=12)
digits = st.text(alphabet="0123456789", min_size=1, max_size=12)
good_date = st.dates(date(2014, 3, 1), date(2014, 3, 31)).map(lambda d: d.strftime("%m/%d/%Y"))
bad_date = st.sampled_from(
    ["02/30/2014", "13/01/2014", "00/10/2014", "3/10/2014", "03/10/14", "2014-03-10", "03/10/2014 ", "０３/10/2014", ""]
)
good_time = st.builds(
    lambda h, m, s, f: f"{h:02d}:{m:02d}:{s:02d}{f}",
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.sampled_from(["", ".0", ".5", ".676", ".123456"]),
)
bad_time = st.sampled_from(
    [
        "24:00:00.000",
        "10:60:00.000",
        "10:00:61.000",
        "10:00",
        "10:00:00.1234567",
        "1:00:00.000",
        "10:00:00.",
        "１0:00:00.000",
        "-1:00:00.000",
        "",
    ]
)
good_decimal = st.builds(
    lambda i, f: i + f,
    st.text(alphabet="0123456789", min_size=1, max_size=10),
    st.sampled_from(["", ".0", ".5", ".25", ".12345678", ".00000001"]),
)
bad_decimal = st.sampled_from(
    [
        "-1.5",
        "+1.5",
        "1e5",
        "1E-2",
        "NaN",
        "inf",
        "12345678901.5",
        "1.123456789",
        " 1.5",
        "1.5 ",
        "1,5",
        ".5",
        "5.",
        "١٢",
        "0x1F",
        "",
    ]
)
good_volume = st.text(alphabet="0123456789", min_size=1, max_size=10)
good_qualifier = st.integers(0, 9999).map(str)


GOOD = [
    good_date,
    good_time,
    good_decimal,
    good_volume,
    good_qualifier,
    st.sampled_from(["", "X"]),
    st.one_of(st.just(""), good_decimal),
]
HOSTILE = [
    st.one_of(bad_date, no_separator),
    st.one_of(bad_time, no_separator),
    st.one_of(bad_decimal, digits, no_separator),
    st.one_of(bad_decimal, digits, no_separator),
    st.one_of(bad_decimal, no_separator),
    no_separator,
    no_separator,
]


@st.composite
def trade_lines(draw) -> str:
    """One line of a trades file: well formed, with up to three hostile fields, or anything at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.text(alphabet=st.characters(codec="utf-8", blacklist_characters="\n\r"), max_size=60))
    hostile = draw(st.sets(st.integers(0, 6), max_size=3)) if kind > 3 else set()
    fields = [draw(HOSTILE[i] if i in hostile else GOOD[i]) for i in range(7)]
    if kind == 1:
        fields = fields[: draw(st.integers(0, 6))]  # missing fields
    elif kind == 2:
        fields += draw(st.lists(no_separator, min_size=1, max_size=3))  # extra fields
    return ",".join(fields)


# -- the oracle: what the row must become, computed independently ---------------------------------

DECIMAL = re.compile(r"[0-9]{1,10}(\.[0-9]{1,8})?", re.ASCII)
WHOLE = re.compile(r"[0-9]{1,10}", re.ASCII)
DATE = re.compile(r"[0-9]{2}/[0-9]{2}/[0-9]{4}", re.ASCII)
TIME = re.compile(r"([0-9]{2}):([0-9]{2}):([0-9]{2})(\.([0-9]{1,6}))?", re.ASCII)


def expected_trade(line: str, company_id: str) -> dict | None:
    """The row's exact V2 values when it is valid, else None (it must be a dead letter)."""
    parts = line.split(",")
    if company_id not in SYMBOLS or len(parts) != 7:
        return None
    day, clock, price, volume, qualifier, venue, field_7 = parts
    if not DATE.fullmatch(day) or not TIME.fullmatch(clock):
        return None
    try:
        local_day = datetime.strptime(day, "%m/%d/%Y").date()
    except ValueError:
        return None
    hour, minute, second, _, fraction = TIME.fullmatch(clock).groups()
    if int(hour) > 23 or int(minute) > 59 or int(second) > 59:
        return None
    micros = int((fraction or "0").ljust(6, "0"))
    if not DECIMAL.fullmatch(price) or not re.search("[1-9]", price):
        return None
    if not WHOLE.fullmatch(volume) or not re.search("[1-9]", volume):
        return None
    if not re.fullmatch(r"[0-9]{1,4}", qualifier, re.ASCII):
        return None
    local = datetime(local_day.year, local_day.month, local_day.day, int(hour), int(minute), int(second), micros)
    vendor = {"company_id": company_id, "qualifier_code": qualifier}
    vendor.update({k: v for k, v in (("venue", venue), ("field_7", field_7)) if v})
    return {
        "symbol": SYMBOLS[company_id],
        "timestamp": local.replace(tzinfo=SYDNEY).astimezone(UTC),  # March 2014: no DST change
        "price": Decimal(price),
        "quantity": Decimal(volume),
        "trade_conditions": [qualifier],
        "vendor_data": vendor,
    }


def raw_table(lines: list[tuple[str, str]]) -> pa.Table:
    return pa.table(
        {
            "file": [f"{company}.csv" for company, _ in lines],
            "line_number": list(range(1, len(lines) + 1)),
            "company_id": [company for company, _ in lines],
            "symbol": [SYMBOLS.get(company) for company, _ in lines],
            "raw": [line for _, line in lines],
        },
        schema=RAW_SCHEMA,
    )


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(["7078", "7458", "9999"]), trade_lines()), min_size=1, max_size=25))
@example([("7078", "03/11/2014,05:43:45.676,36.5,100,0,,")])
@example([("7078", "03/11/2014,10:00:00.000,36.5,100,0,X,36.49"), ("9999", "03/11/2014,10:00:00.000,1,1,0,,")])
def test_every_trade_row_is_one_row_or_one_dead_letter_with_its_reason(lines):
    day = normalise_trades(raw_table(lines), "2014-03-11")
    rows = {r["source_sequence"]: r for r in day.rows.to_pylist()}
    letters = {d["line_number"]: d for d in day.dead_letters.to_pylist()}
    assert day.valid + day.rejected == len(lines)
    assert len(rows) == day.valid and len(letters) == day.rejected  # no line twice
    assert set(rows) | set(letters) == set(range(1, len(lines) + 1)) and not set(rows) & set(letters)
    assert day.rows.schema == TRADES.arrow_schema()  # storable as is
    check_against_model(day.rows, "trades", sample=day.valid)

    for number, (company, line) in enumerate(lines, start=1):
        expected = expected_trade(line, company)
        if expected is None:
            assert number in letters, f"line {line!r} of {company} should be a dead letter"
            letter = letters[number]
            assert letter["raw"] == line and letter["reason"].strip() and letter["source"] == "asx_trades"
            assert letter["file"] == f"{company}.csv"
        else:
            assert number in rows, f"line {line!r} should load, was dead-lettered: {letters[number]['reason']}"
            row = rows[number]
            assert {k: row[k] for k in ("symbol", "timestamp", "price", "quantity", "trade_conditions")} == {
                k: expected[k] for k in ("symbol", "timestamp", "price", "quantity", "trade_conditions")
            }
            assert dict(row["vendor_data"]) == expected["vendor_data"]
            assert (row["exchange"], row["currency"], row["side"]) == ("ASX", "AUD", "UNKNOWN")


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(trade_lines(), min_size=1, max_size=15))
def test_every_line_of_a_file_lands_in_exactly_one_day(tmp_path_factory, lines):
    """Through the file reader: whatever a line holds, it belongs to one trading day and is read once."""
    root = tmp_path_factory.mktemp("asx")
    (root / "reference-data").mkdir()
    (root / "reference-data" / "company_info.csv").write_text("company_id,symbol\n7078,BHP\n")
    (root / "trades").mkdir()
    anchor = "03/12/2014,10:00:00.000,36.5,100,0,,"  # every real file has dated lines
    all_lines = [anchor, *lines]
    (root / "trades" / "7078.csv").write_bytes("".join(f"{line}\r\n" for line in all_lines).encode())
    seen: dict[int, int] = {}
    for day in trading_days(Path(root)):
        result = normalise_trades(read_raw_day(Path(root), "trades", day), day)
        numbers = [r["source_sequence"] for r in result.rows.to_pylist()]
        numbers += [d["line_number"] for d in result.dead_letters.to_pylist()]
        for number in numbers:
            seen[number] = seen.get(number, 0) + 1
    assert seen == {number: 1 for number in range(1, len(all_lines) + 1)}
