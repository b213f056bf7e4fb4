"""ASX normalisation on small hand-made files: time zones, symbols, empty quote sides, dead letters."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from k2_resources.asx.files import read_raw_day, trading_days
from k2_resources.asx.normalise import normalise_quotes, normalise_trades
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.schemas.models import QuoteV2, TradeV2

COMPANIES = (
    "company_id,symbol,company_name,ISIN,start_date,end_date\n"
    "7078,BHP,BHP BILLITON LTD,AU000000BHP4,05/07/2008,03/31/2014\n"
)


def make_source(
    root: Path, trades: dict[str, list[str]] | None = None, quotes: dict[str, list[str]] | None = None
) -> Path:
    """An ASX data folder with the given lines per company id (CRLF line ends, like the real files)."""
    (root / "reference-data").mkdir(parents=True)
    (root / "reference-data" / "company_info.csv").write_text(COMPANIES)
    for kind, files in (("trades", trades or {}), ("quotes", quotes or {})):
        (root / kind).mkdir()
        for company_id, lines in files.items():
            (root / kind / f"{company_id}.csv").write_bytes("".join(f"{line}\r\n" for line in lines).encode())
    return root


def trades_of(root: Path, day: str):
    return normalise_trades(read_raw_day(root, "trades", day), day)


def test_sydney_early_morning_is_the_previous_utc_day(tmp_path: Path) -> None:
    root = make_source(
        tmp_path, trades={"7078": ["03/11/2014,05:43:45.676,36.5,100,0,,", "03/11/2014,16:10:00.000,36.6,5,0,,"]}
    )
    rows = trades_of(root, "2014-03-11").rows.to_pylist()
    assert [r["timestamp"] for r in rows] == [
        datetime(2014, 3, 10, 18, 43, 45, 676000, tzinfo=UTC),
        datetime(2014, 3, 11, 5, 10, tzinfo=UTC),
    ]
    # The same instants as zoneinfo gives row by row.
    sydney = ZoneInfo("Australia/Sydney")
    assert rows[0]["timestamp"] == datetime(2014, 3, 11, 5, 43, 45, 676000, tzinfo=sydney).astimezone(UTC)
    assert local_day_bounds_utc("2014-03-11") == (
        datetime(2014, 3, 10, 13, tzinfo=UTC),
        datetime(2014, 3, 11, 13, tzinfo=UTC),
    )


def test_winter_days_use_standard_time(tmp_path: Path) -> None:
    root = make_source(tmp_path, trades={"7078": ["06/10/2014,10:00:00.000,36.5,100,0,,"]})
    (row,) = trades_of(root, "2014-06-10").rows.to_pylist()
    assert row["timestamp"] == datetime(2014, 6, 10, 0, 0, tzinfo=UTC)  # AEST, UTC+10


def test_local_times_in_a_daylight_saving_change_are_dead_letters(tmp_path: Path) -> None:
    # 5 Oct 2014 02:00 -> 03:00 (02:30 never happened); 6 Apr 2014 03:00 -> 02:00 (02:30 happened twice).
    root = make_source(
        tmp_path,
        trades={"7078": ["04/06/2014,02:30:00.000,36.5,100,0,,", "10/05/2014,02:30:00.000,36.5,100,0,,"]},
    )
    for day in ("2014-04-06", "2014-10-05"):
        result = trades_of(root, day)
        assert result.valid == 0
        (letter,) = result.dead_letters.to_pylist()
        assert "daylight-saving" in letter["reason"] and letter["source"] == "asx_trades"


def test_company_ids_map_to_symbols_and_unknown_ids_are_dead_letters(tmp_path: Path) -> None:
    line = "03/10/2014,10:00:00.000,36.5,100,0,,"
    root = make_source(tmp_path, trades={"7078": [line], "9999": [line, line]})
    result = trades_of(root, "2014-03-10")
    (row,) = result.rows.to_pylist()
    assert (row["symbol"], row["exchange"], row["currency"], row["asset_class"], row["side"]) == (
        "BHP",
        "ASX",
        "AUD",
        "equities",
        "UNKNOWN",
    )
    assert row["trade_id"] == "ASX-BHP-20140310-1"
    assert dict(row["vendor_data"]) == {"company_id": "7078", "qualifier_code": "0"}
    letters = result.dead_letters.to_pylist()
    assert [(Path(d["file"]).name, d["line_number"]) for d in letters] == [("9999.csv", 1), ("9999.csv", 2)]
    assert all("company id 9999 is not in reference-data/company_info.csv" in d["reason"] for d in letters)


def test_empty_quote_side_is_a_null_price_not_a_bad_row(tmp_path: Path) -> None:
    root = make_source(
        tmp_path,
        quotes={
            "7078": [
                "03/10/2014,05:43:45.676,37.7,0.0,300,0",
                "03/10/2014,05:43:45.676,37.7,37.73,300,600",
                "03/10/2014,05:43:46.000,0.0,37.73,25,600",
            ]
        },
    )
    result = normalise_quotes(read_raw_day(root, "quotes", "2014-03-10"), "2014-03-10")
    rows = result.rows.to_pylist()
    assert len(rows) == 2
    assert rows[0]["ask_price"] is None and rows[0]["ask_quantity"] is None
    assert str(rows[0]["bid_price"]) == "37.70000000"
    assert str(rows[1]["ask_price"]) == "37.73000000"
    (letter,) = result.dead_letters.to_pylist()
    assert letter["line_number"] == 3 and letter["reason"] == "bid price is 0 (empty side) but bid volume is 25"
    for row in rows:
        row["vendor_data"] = dict(row["vendor_data"])
        QuoteV2(**row)


def test_bad_trade_rows_become_dead_letters_with_line_and_reason(tmp_path: Path) -> None:
    lines = [
        "03/10/2014,10:00:00.000,36.5,100,0,,",  # 1 good
        "03/10/2014,10:00:01.000,36.5",  # 2 truncated
        "03/10/2014,10:00:02.000,abc,100,0,,",  # 3 price not a number
        "03/10/2014,10:00:03.000,-1.5,100,0,,",  # 4 negative price
        "03/10/2014,10:00:04.000,0.0,100,0,,",  # 5 zero price
        "03/10/2014,10:00:05.000,36.5,0,0,,",  # 6 zero volume
        "03/10/2014,25:00:06.000,36.5,10,0,,",  # 7 impossible time
        "03/10/2014,10:00:07.000,36.5,10,,,",  # 8 no qualifier
        "03/10/2014,10:00:08.000,36.512345678,10,0,,",  # 9 nine decimal places
        "03/10/2014,10:00:09.000,36.6,7,3,X,36.61",  # 10 good, venue and 7th field
    ]
    root = make_source(tmp_path, trades={"7078": lines})
    result = trades_of(root, "2014-03-10")
    assert [r["source_sequence"] for r in result.rows.to_pylist()] == [1, 10]
    letters = {d["line_number"]: d for d in result.dead_letters.to_pylist()}
    assert sorted(letters) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert letters[2]["reason"].startswith("expected 7 comma-separated fields") and "found 3" in letters[2]["reason"]
    assert letters[3]["reason"] == "price 'abc' is not a decimal with up to 10 integer and 8 fractional digits"
    assert letters[4]["reason"].startswith("price '-1.5' is not a decimal")
    assert letters[5]["reason"] == "price '0.0' must be > 0"
    assert letters[6]["reason"] == "volume '0' must be > 0"
    assert letters[7]["reason"] == "time '25:00:06.000' is not a valid HH:MM:SS.fff time"
    assert letters[8]["reason"] == "qualifier code '' is not a number"
    assert letters[9]["reason"].startswith("price '36.512345678' is not a decimal")
    assert all(d["raw"] == lines[n - 1] and d["partition_key"] == "2014-03-10" for n, d in letters.items())
    last = result.rows.to_pylist()[-1]
    assert last["trade_conditions"] == ["3"]
    assert dict(last["vendor_data"]) == {"company_id": "7078", "qualifier_code": "3", "venue": "X", "field_7": "36.61"}


def test_a_line_without_a_date_belongs_to_the_day_before_it(tmp_path: Path) -> None:
    root = make_source(
        tmp_path,
        trades={"7078": ["03/10/2014,10:00:00.000,36.5,100,0,,", "garbage", "03/11/2014,10:00:00.000,36.6,100,0,,"]},
    )
    assert trading_days(root) == ["2014-03-10", "2014-03-11"]
    day10, day11 = trades_of(root, "2014-03-10"), trades_of(root, "2014-03-11")
    assert (day10.valid, day10.rejected, day11.valid, day11.rejected) == (1, 1, 1, 0)
    (letter,) = day10.dead_letters.to_pylist()
    assert (letter["line_number"], letter["raw"]) == (2, "garbage")
    assert letter["reason"].startswith("expected 7 comma-separated fields")


def test_ids_are_deterministic_and_rows_satisfy_the_trade_model(tmp_path: Path) -> None:
    lines = [f"03/10/2014,10:00:{s:02d}.000,36.5,{s + 1},0,," for s in range(20)]
    root = make_source(tmp_path, trades={"7078": lines})
    first, second = trades_of(root, "2014-03-10"), trades_of(root, "2014-03-10")
    ids = [(r["message_id"], r["trade_id"]) for r in first.rows.to_pylist()]
    assert ids == [(r["message_id"], r["trade_id"]) for r in second.rows.to_pylist()]
    assert len(set(ids)) == 20
    for row in first.rows.to_pylist():
        row["vendor_data"] = dict(row["vendor_data"])
        assert TradeV2(**row).symbol == "BHP"


def test_missing_data_dir_names_the_fix(tmp_path: Path) -> None:
    from k2_resources.errors import K2Error

    with pytest.raises(K2Error, match="K2_ASX_DATA_DIR"):
        trading_days(tmp_path / "nowhere")
