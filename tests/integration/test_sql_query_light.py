"""The light SQL path (`k2 query sql`) and the ASX write path at scale, against a real Iceberg catalog.

- k2_resources.query.sql_query reads the SQLite catalog with sqlite3 and must answer exactly what the
  DuckDBQueryResource (pyiceberg) answers, empty tables included, and `k2 query sql` must import
  neither Dagster nor pyiceberg nor pyarrow;
- the ASX writer's own partition split gives the partitions pyiceberg's split would;
- a generated ASX day keeps validation exact: its malformed lines, and only those, are dead letters.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
from pyiceberg.io.pyarrow import _determine_partitions

from k2_resources.asx.files import read_raw_day
from k2_resources.asx.normalise import normalise_trades
from k2_resources.asx.writes import ingest_day
from k2_resources.catalog.partitioning import partition_slices
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.settings import catalog_properties
from k2_resources.query.duckdb_query import DuckDBQueryResource
from k2_resources.query.sql_query import live_data_files, run_sql, sqlite_table_locations
from tests.support.asx_generator import MALFORMED_LINES, write_asx_trades_day


@pytest.fixture
def generated_day(tmp_path: Path):
    return write_asx_trades_day(tmp_path / "asx", rows=30_000)


def test_light_sql_answers_what_the_resource_answers(k2_home: Path, generated_day) -> None:
    iceberg = IcebergResource()
    ingest_day(generated_day.data_dir, iceberg, "trades", generated_day.day.isoformat())
    # Loaded again: the replace deletes the first load's files, which the manifests then list as deleted.
    ingest_day(generated_day.data_dir, iceberg, "trades", generated_day.day.isoformat())
    locations = sqlite_table_locations(catalog_properties())
    assert locations is not None and {"market.trades", "market.quotes", "market.dead_letters"} <= set(locations)
    trades_metadata = json.loads(Path(urlparse(locations["market.trades"]).path).read_text())
    live_files = live_data_files(trades_metadata)
    assert live_files, "the trades table should be read as plain Parquet files, without the iceberg extension"
    planned = {Path(urlparse(task.file.file_path).path).name for task in iceberg.trades().scan().plan_files()}
    assert planned == {Path(file).name for file in live_files}
    resource = DuckDBQueryResource(iceberg=iceberg)
    for sql in (
        "select count(*), sum(price), min(timestamp), max(source_sequence) from market.trades",
        "select symbol, count(*) from market.trades group by 1 order by 1",
        "select line_number, reason from market.dead_letters order by line_number",
        "select count(*) from market.quotes",  # no snapshot yet: an empty view of its schema
        "select * from market.quotes limit 1",
    ):
        columns, rows = run_sql(sql)
        expected = resource.query(sql)
        assert columns == expected.column_names
        assert rows == [tuple(row.values()) for row in expected.to_pylist()], sql
    # Values are bound, never pasted.
    assert run_sql("select count(*) from market.trades where symbol = ?", ["BHP"])[1] == [
        (generated_day.rows_per_symbol["BHP"] - generated_day.malformed,)
    ]


def test_k2_query_sql_imports_no_dagster_pyiceberg_or_pyarrow(k2_home: Path) -> None:
    IcebergResource().catalog()  # the tables exist, all empty
    probe = (
        "import sys\nfrom k2_assets.cli import main\n"
        "assert main(['query', 'sql', 'select count(*) as n from market.trades', '--format', 'csv']) == 0\n"
        "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in "
        "('dagster', 'pyiceberg', 'pyarrow', 'polars', 'sqlalchemy')}), file=sys.stderr)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["n", "0"]
    assert result.stderr.strip().splitlines()[-1] == "[]"


def test_partition_split_matches_pyiceberg_and_dead_letters_are_exact(k2_home: Path, generated_day) -> None:
    day = generated_day.day.isoformat()
    normalised = normalise_trades(read_raw_day(generated_day.data_dir, "trades", day), day)
    assert normalised.rejected == generated_day.malformed == len(MALFORMED_LINES)
    assert normalised.valid == generated_day.rows - generated_day.malformed
    table = IcebergResource().trades()
    rows = normalised.rows.cast(table.schema().as_arrow())
    ours = partition_slices(table.metadata, rows)
    assert ours is not None and len(ours) == 2  # a Sydney day spans two UTC days
    theirs = list(_determine_partitions(table.metadata.spec(), table.metadata.schema(), rows))
    as_dict = {key.partition: piece for key, piece in ours}
    assert set(as_dict) == {p.partition_key.partition for p in theirs}
    for partition in theirs:
        mine = as_dict[partition.partition_key.partition]
        assert sorted(mine.column("message_id").to_pylist()) == sorted(
            partition.arrow_table_partition.column("message_id").to_pylist()
        )
    assert sum(piece.num_rows for _, piece in ours) == rows.num_rows


def test_the_generator_is_deterministic(tmp_path: Path) -> None:
    first = write_asx_trades_day(tmp_path / "a", rows=5_000)
    second = write_asx_trades_day(tmp_path / "b", rows=5_000)
    for path in sorted((first.data_dir / "trades").glob("*.csv")):
        assert path.read_bytes() == (second.data_dir / "trades" / path.name).read_bytes()
    assert sum(first.rows_per_symbol.values()) == 5_000
