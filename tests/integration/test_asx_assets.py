"""The ASX asset graph end to end: real Dagster runs, real Iceberg tables in a temporary K2_HOME."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from dagster import AssetCheckSeverity, DagsterInstance, materialize
from pyiceberg.expressions import EqualTo

from k2_assets.asx import asx_quotes, asx_raw_quotes, asx_raw_trades, asx_trades, asx_trading_days
from k2_resources.asx.files import default_data_dir
from k2_resources.asx.source import AsxSourceResource
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.catalog.resource import IcebergResource
from k2_resources.query.duckdb_query import DuckDBQueryResource
from tests.support.breakpoints import met

pytestmark = pytest.mark.integration

DAYS = ["2014-03-10", "2014-03-11", "2014-03-12", "2014-03-13", "2014-03-14"]

# Every one of the 200,545 trade rows and 169,629 quote rows in data/asx passes validation: the
# files hold no malformed line, no zero or negative price or volume, no time in a daylight-saving
# change, and the only empty book sides (20 quotes with ask 0.0 and ask volume 0) are valid rows
# with a null ask. So the counts below are the CSV counts, per Sydney trading day and symbol.
TRADES_PER_DAY = {
    "2014-03-10": {"BHP": 17000, "DVN": 19, "MWR": 4, "RIO": 25853},
    "2014-03-11": {"BHP": 21681, "DVN": 43, "MWR": 3, "RIO": 34488},
    "2014-03-12": {"BHP": 20283, "DVN": 40, "MWR": 3, "RIO": 14401},
    "2014-03-13": {"BHP": 16309, "DVN": 17, "MWR": 1, "RIO": 17030},
    "2014-03-14": {"BHP": 16358, "DVN": 113, "RIO": 16899},  # MWR did not trade on 14 March
}
QUOTES_PER_DAY = {
    "2014-03-10": {"BHP": 14312, "DVN": 41, "MWR": 9, "RIO": 20752},
    "2014-03-11": {"BHP": 17980, "DVN": 113, "MWR": 19, "RIO": 25301},
    "2014-03-12": {"BHP": 17827, "DVN": 99, "MWR": 17, "RIO": 14337},
    "2014-03-13": {"BHP": 14246, "DVN": 52, "MWR": 7, "RIO": 15224},
    "2014-03-14": {"BHP": 13484, "DVN": 244, "MWR": 8, "RIO": 15557},
}
TRADES_TOTAL = {"BHP": 91631, "DVN": 232, "MWR": 11, "RIO": 108671}
ALL_ASSETS = [asx_raw_trades, asx_trades, asx_raw_quotes, asx_quotes]


def _resources(data_dir: Path | None = None) -> dict[str, object]:
    iceberg = IcebergResource()
    return {
        "asx_source": AsxSourceResource(data_dir=str(data_dir) if data_dir else None),
        "iceberg": iceberg,
        "duckdb": DuckDBQueryResource(iceberg=iceberg),
    }


def _materialise(instance: DagsterInstance, day: str, assets=ALL_ASSETS, data_dir: Path | None = None):
    result = materialize(assets, partition_key=day, instance=instance, resources=_resources(data_dir))
    assert result.success
    return result


def _counts_per_day(table: str) -> dict[str, dict[str, int]]:
    """rows per symbol for each Sydney trading day, selected by the day's UTC bounds."""
    query = DuckDBQueryResource()
    counts = {}
    for day in DAYS:
        start, end = local_day_bounds_utc(day)
        rows = query.query(
            f'select symbol, count(*) as n from {table} where exchange = ? and "timestamp" >= ? '
            'and "timestamp" < ? group by 1 order by 1',
            ["ASX", start, end],
        ).to_pylist()
        counts[day] = {r["symbol"]: r["n"] for r in rows}
    return counts


def _k2_query_csv(sql: str) -> list[list[str]]:
    """`k2 query sql ... --format csv` as a user runs it (own process, same K2_HOME)."""
    # A process of its own: in-process, print_table's `out=sys.stdout` default is bound at import
    # and so keeps writing to whichever stdout the first caller had.
    done = subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", "query", "sql", sql, "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert done.returncode == 0, done.stderr
    return [line.split(",") for line in done.stdout.strip().splitlines()]


def test_partitions_are_the_trading_days_in_the_files() -> None:
    assert asx_trading_days.get_partition_keys() == DAYS


def test_five_days_load_exactly_and_rematerialising_a_day_replaces_it(k2_home: Path) -> None:
    instance = DagsterInstance.ephemeral()
    for day in DAYS:
        result = _materialise(instance, day)
        evaluations = result.get_asset_check_evaluations()
        assert len(evaluations) == 10  # 1 + 4 per kind
        assert all(e.passed for e in evaluations), [(e.asset_key, e.check_name) for e in evaluations if not e.passed]

    assert _counts_per_day("market.trades") == TRADES_PER_DAY
    assert _counts_per_day("market.quotes") == QUOTES_PER_DAY
    rows = _k2_query_csv("select symbol, count(*) as n from market.trades group by 1 order by 1")
    assert rows[0] == ["symbol", "n"]
    assert {symbol: int(n) for symbol, n in rows[1:]} == TRADES_TOTAL
    assert _k2_query_csv("select count(*) as n from market.dead_letters") == [["n"], ["0"]]

    # 05:43 on 11 March in Sydney is 18:43 on 10 March UTC: the day's first quote sits in the
    # UTC partition it shares with 10 March's trading, so replacing 11 March must not touch 10 March.
    first_quote = (
        DuckDBQueryResource()
        .query('select min("timestamp") as t from market.quotes where quote_id like ?', ["ASX-%-20140311-%"])
        .column("t")[0]
        .as_py()
    )
    assert first_quote.astimezone(UTC).date() == datetime(2014, 3, 10).date()

    trades = IcebergResource().trades()
    snapshot_before = trades.current_snapshot().snapshot_id
    _materialise(instance, "2014-03-11")
    assert IcebergResource().trades().current_snapshot().snapshot_id != snapshot_before
    assert _counts_per_day("market.trades") == TRADES_PER_DAY
    assert _counts_per_day("market.quotes") == QUOTES_PER_DAY
    rows = _k2_query_csv("select count(*) as n, count(distinct trade_id) as ids from market.trades")
    assert rows[1] == ["200545", "200545"]


def test_a_malformed_row_is_a_dead_letter_and_the_rest_of_the_day_loads(k2_home: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "asx"
    shutil.copytree(default_data_dir(), data_dir)
    bhp = data_dir / "trades" / "7078.csv"
    lines = bhp.read_bytes().split(b"\r\n")
    first_of_day = next(i for i, line in enumerate(lines) if line.startswith(b"03/12/2014"))
    bad = [b"03/12/2014,10:00:00.000,abc,100,0,,", b"03/12/2014,10:00:01.000,36.5"]
    bhp.write_bytes(b"\r\n".join(lines[: first_of_day + 1] + bad + lines[first_of_day + 1 :]))

    instance = DagsterInstance.ephemeral()
    result = _materialise(instance, "2014-03-12", [asx_raw_trades, asx_trades], data_dir)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["rows_match_valid_csv_rows"].passed
    assert not checks["no_dead_letters"].passed and checks["no_dead_letters"].severity == AssetCheckSeverity.WARN

    letters = IcebergResource().dead_letters().scan(row_filter=EqualTo("partition_key", "2014-03-12")).to_arrow()
    got = sorted((r["line_number"], r["raw"], r["reason"], r["source"], r["file"]) for r in letters.to_pylist())
    assert got == [
        (
            first_of_day + 2,
            bad[0].decode(),
            "price 'abc' is not a decimal with up to 10 integer and 8 fractional digits",
            "asx_trades",
            str(bhp),
        ),
        (
            first_of_day + 3,
            bad[1].decode(),
            "expected 7 comma-separated fields (date,time,price,volume,qualifier,venue,field_7), found 3",
            "asx_trades",
            str(bhp),
        ),
    ]
    assert _counts_per_day("market.trades")["2014-03-12"] == TRADES_PER_DAY["2014-03-12"]

    # Fixing the file and re-materialising the day replaces its dead letters too.
    shutil.copyfile(default_data_dir() / "trades" / "7078.csv", bhp)
    _materialise(instance, "2014-03-12", [asx_raw_trades, asx_trades], data_dir)
    assert (
        IcebergResource().dead_letters().scan(row_filter=EqualTo("partition_key", "2014-03-12")).to_arrow().num_rows
        == 0
    )
    assert _counts_per_day("market.trades")["2014-03-12"] == TRADES_PER_DAY["2014-03-12"]


def test_days_written_at_the_same_time_by_separate_processes_all_land_once(k2_home: Path, tmp_path: Path) -> None:
    """A UI backfill runs up to four days at once; their Iceberg commits race and must all land,
    including two runs of the same day (the later one replaces the earlier).

    The race is forced: each process, having loaded the table for its day's commit, waits there
    until every process has (a barrier on entering the commit), so all of them commit against the
    same snapshot and all but one must meet a conflict, which is logged and retried."""
    IcebergResource().catalog()  # tables exist before the race, as after the first run
    days = DAYS + ["2014-03-11"]
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    script = (
        "import logging, sys\n"
        "from pathlib import Path\n"
        "from k2_resources.asx.files import default_data_dir\n"
        "from k2_resources.asx.writes import ingest_day\n"
        "from k2_resources.catalog.resource import IcebergResource\n"
        "from k2_resources.catalog.writes import replace_with_files\n"
        "from tests.support.breakpoints import meet_on_entry, nested_code\n"
        "logging.basicConfig(level=logging.WARNING)\n"  # pyiceberg's retries are warnings
        "logging.getLogger('k2_resources.catalog.commit').setLevel(logging.INFO)\n"
        f"meet_on_entry(nested_code(replace_with_files, 'commit'), Path({str(barrier)!r}), {len(days)}, 600)\n"
        "print(ingest_day(default_data_dir(), IcebergResource(), 'trades', sys.argv[1]).valid)\n"
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", script, day],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ),
        )
        for day in days
    ]
    outputs = [worker.communicate(timeout=600) for worker in workers]
    assert [w.returncode for w in workers] == [0] * len(days), [err[-2000:] for _, err in outputs]
    assert [int(out) for out, _ in outputs] == [sum(TRADES_PER_DAY[day].values()) for day in days]
    assert met(barrier, len(days))  # every writer reached its commit while the others waited there
    # Each conflict is logged where it is retried: by K2's commit layer ("conflicted"), or by
    # pyiceberg's own retry inside the commit ("concurrent update"), which these writes leave on.
    conflicts = sum(err.count("conflicted") + err.count("due to a concurrent update") for _, err in outputs)
    assert conflicts >= len(days) - 1, "the commits never raced, so the test proved nothing"
    assert _counts_per_day("market.trades") == TRADES_PER_DAY
    ids = (
        DuckDBQueryResource()
        .query("select count(*) as n, count(distinct trade_id) as d from market.trades")
        .to_pylist()
    )
    assert ids == [{"n": 200545, "d": 200545}]
