"""The ASX trades write that overlaps reading and writing (k2_resources.asx.writes.ingest_day):
each file's rows go to Parquet while the next file is read, and one transaction commits them.

Against a real Iceberg catalog on disk:
- the table then holds exactly the rows of the line-by-line path, in data files of one symbol,
  and the rows the CSV files hold by a plain reading of the format in this test;
- a file that needs the line-by-line path (a quote) makes the whole day take it (the column-wise
  reader declines the day), the table holds the CSV's rows, and no data file written before
  that is left behind unreferenced;
- files written for one schema are never committed to a table whose schema changed since;
- each data file's metrics are those pyiceberg's own writer gives (none of the bounds it leaves out
  inside lists and maps are computed; a column of one value takes its bounds from that value).
"""

from __future__ import annotations

import csv
import re
import uuid
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from urllib.parse import urlparse
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.io.pyarrow import write_file
from pyiceberg.types import StringType

from k2_resources.asx.columnar_trades import trade_file_days
from k2_resources.asx.errors import ColumnarDeclined
from k2_resources.asx.files import read_raw_day
from k2_resources.asx.normalise import normalise_trades
from k2_resources.asx.writes import day_filter, ingest_day
from k2_resources.catalog.data_files import data_file_writer, file_write_tasks
from k2_resources.catalog.errors import TableChangedError
from k2_resources.catalog.partitioning import in_table_schema
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.catalog.writes import replace_with_files
from tests.support.asx_generator import write_asx_trades_day

_ORDER = [("symbol", "ascending"), ("timestamp", "ascending"), ("source_sequence", "ascending")]
_COMPARED = [
    "message_id",
    "trade_id",
    "symbol",
    "timestamp",
    "price",
    "quantity",
    "source_sequence",
    "trade_conditions",
]


def _csv_trades(data_dir: Path, day: date) -> Counter:
    """The valid trades of ``day`` in the CSV files, read by the format alone (no K2 code): lines
    ``MM/DD/YYYY,HH:MM:SS.mmm,price,volume,qualifier,venue,field_7`` split on commas (a quote is no
    field delimiter in these files), Sydney local time, price a decimal > 0 with at most 8 places,
    volume a whole number > 0, qualifier a number. A multiset of (symbol, UTC time, price,
    quantity, conditions)."""
    with (data_dir / "reference-data" / "company_info.csv").open() as handle:
        symbols = {row["company_id"]: row["symbol"] for row in csv.DictReader(handle)}
    sydney, wanted = ZoneInfo("Australia/Sydney"), f"{day:%m/%d/%Y}"
    trades: Counter = Counter()
    for path in (data_dir / "trades").glob("*.csv"):
        for line in path.read_text().splitlines():
            fields = line.split(",")
            if len(fields) != 7 or fields[0] != wanted:
                continue
            _, clock, price, volume, qualifier, _, _ = fields
            if not (
                re.fullmatch(r"\d{2}:\d{2}:\d{2}\.\d{3}", clock)
                and re.fullmatch(r"\d{1,10}(\.\d{1,8})?", price)
                and Decimal(price) > 0
                and re.fullmatch(r"\d{1,10}", volume)
                and int(volume) > 0
                and re.fullmatch(r"\d{1,4}", qualifier)
            ):
                continue
            try:
                local = datetime.strptime(f"{fields[0]} {clock}", "%m/%d/%Y %H:%M:%S.%f")
            except ValueError:
                continue  # no such time of day
            moment = local.replace(tzinfo=sydney).astimezone(UTC)
            trades[(symbols[path.stem], moment, Decimal(price), Decimal(volume), (qualifier,))] += 1
    return trades


def _table_trades(iceberg: IcebergResource) -> Counter:
    """Every row of market.trades as (symbol, time, price, quantity, conditions)."""
    rows = iceberg.trades().scan(selected_fields=("symbol", "timestamp", "price", "quantity", "trade_conditions"))
    return Counter(
        (r["symbol"], r["timestamp"], r["price"], r["quantity"], tuple(r["trade_conditions"]))
        for r in rows.to_arrow().to_pylist()
    )


def _table_rows(iceberg: IcebergResource, day: str) -> pa.Table:
    return iceberg.trades().scan(row_filter=day_filter(day)).to_arrow().select(_COMPARED).sort_by(_ORDER)


def _assert_same_rows(actual: pa.Table, expected: pa.Table) -> None:
    """Equal values; the table reads strings as string, the normaliser builds large_string."""
    expected = expected.select(_COMPARED).sort_by(_ORDER)
    assert actual.num_rows == expected.num_rows
    assert actual.equals(expected.cast(actual.schema))


def _parquet_files_on_disk(iceberg: IcebergResource) -> set[str]:
    data = Path(urlparse(iceberg.trades().metadata.location).path) / "data"
    return {path.name for path in data.rglob("*.parquet")}


def _planned_files(iceberg: IcebergResource) -> set[str]:
    return {Path(urlparse(task.file.file_path).path).name for task in iceberg.trades().scan().plan_files()}


def test_the_table_holds_the_line_by_line_rows(k2_home: Path, tmp_path: Path) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=40_000)
    day = generated.day.isoformat()
    iceberg = IcebergResource()
    result = ingest_day(generated.data_dir, iceberg, "trades", day)
    expected = normalise_trades(read_raw_day(generated.data_dir, "trades", day), day)
    assert (
        (result.valid, result.rejected)
        == (expected.valid, expected.rejected)
        == (generated.rows - generated.malformed, generated.malformed)
    )
    _assert_same_rows(_table_rows(iceberg, day), expected.rows)
    assert _table_trades(iceberg) == _csv_trades(generated.data_dir, generated.day)
    assert result.rows_per_symbol == {symbol: count for symbol, count in generated.rows_per_symbol.items() if count} | {
        "BHP": generated.rows_per_symbol["BHP"] - generated.malformed
    }
    symbol_id = iceberg.trades().schema().find_field("symbol").field_id
    files = [task.file for task in iceberg.trades().scan().plan_files()]
    # One symbol per data file (the file it was read from), with the bounds and counts readers prune by.
    assert len({file.lower_bounds[symbol_id] for file in files}) == len(result.rows_per_symbol)
    assert all(file.lower_bounds[symbol_id] == file.upper_bounds[symbol_id] for file in files)
    assert sum(file.record_count for file in files) == result.valid
    assert all(file.null_value_counts[symbol_id] == 0 for file in files)
    # Every data file on disk is in the snapshot: nothing written was left out of the commit.
    assert _parquet_files_on_disk(iceberg) == _planned_files(iceberg)


def test_a_file_that_needs_the_general_path_leaves_no_data_file_behind(k2_home: Path, tmp_path: Path) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=40_000)
    day = generated.day.isoformat()
    last_file = sorted((generated.data_dir / "trades").glob("*.csv"))[-1]
    with last_file.open("a") as out:  # a quoted field: the column-wise reader declines the file
        out.write(f'{generated.day:%m/%d/%Y},10:00:00.000,"1.5",100,0,,\n')
    with pytest.raises(ColumnarDeclined):  # the column-wise reader declines this day: ingest_day takes the general path
        list(trade_file_days(generated.data_dir, day))
    iceberg = IcebergResource()
    result = ingest_day(generated.data_dir, iceberg, "trades", day)
    source = _csv_trades(generated.data_dir, generated.day)
    # the quoted price is no decimal: one more dead letter than the generator's malformed lines
    assert (result.valid, result.rejected) == (source.total(), generated.malformed + 1)
    assert _table_trades(iceberg) == source
    assert _parquet_files_on_disk(iceberg) == _planned_files(iceberg)


def test_files_written_for_an_older_schema_are_not_committed(k2_home: Path, tmp_path: Path) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=5_000, malformed=0)
    day = generated.day.isoformat()
    rows = normalise_trades(read_raw_day(generated.data_dir, "trades", day), day).rows
    iceberg = IcebergResource()
    table = iceberg.trades()
    written_for = table.metadata
    tasks = file_write_tasks(
        written_for, in_table_schema(rows, written_for.schema().as_arrow()), uuid.uuid4(), iter(range(1_000))
    )
    assert tasks
    data_files = [data_file_writer(table.io, written_for)(task) for task in tasks]
    with table.update_schema() as update:
        update.add_column("venue_note", StringType())
    with pytest.raises(TableChangedError):
        replace_with_files(iceberg.trades, written_for, data_files, day_filter(day), {"k2.rows": str(rows.num_rows)})
    assert iceberg.trades().current_snapshot() is None


def test_data_file_metrics_are_pyicebergs(k2_home: Path, tmp_path: Path) -> None:
    generated = write_asx_trades_day(tmp_path / "asx", rows=3_000, malformed=0)
    day = generated.day.isoformat()
    records = normalise_trades(read_raw_day(generated.data_dir, "trades", day), day).rows.slice(0, 400).to_pylist()
    # Null and empty lists and maps, and null map values: Parquet counts each as a null at the leaf.
    for index in range(0, 400, 7):
        records[index]["trade_conditions"] = None if index % 2 else []
    for index in range(0, 400, 11):
        records[index]["vendor_data"] = None if index % 2 else []
    for index in range(3, 400, 13):
        records[index]["vendor_data"] = [("company_id", None), ("qualifier_code", "0")]
    rows = pa.Table.from_pylist(records, schema=TRADES.arrow_schema())
    table = IcebergResource().trades()
    metadata = table.metadata
    rows = in_table_schema(rows, metadata.schema().as_arrow())
    ours = [
        data_file_writer(table.io, metadata)(task)
        for task in file_write_tasks(metadata, rows, uuid.uuid4(), iter(range(100)))
    ]
    theirs = list(
        write_file(table.io, metadata, iter(file_write_tasks(metadata, rows, uuid.uuid4(), iter(range(100)))))
    )
    assert len(ours) == len(theirs) >= 1
    schema = metadata.schema()
    collection_ids = {
        schema.find_field(f"{name}.{leaf}").field_id
        for name, leaves in (("trade_conditions", ("element",)), ("vendor_data", ("key", "value")))
        for leaf in leaves
    }
    for mine, reference in zip(ours, theirs):
        assert mine.record_count == reference.record_count
        assert mine.value_counts == reference.value_counts
        assert mine.null_value_counts == reference.null_value_counts
        assert collection_ids <= set(mine.value_counts) and collection_ids <= set(mine.null_value_counts)
        assert not set(mine.lower_bounds) & collection_ids  # no bounds inside lists and maps, as Iceberg Java
        assert (mine.lower_bounds, mine.upper_bounds) == (reference.lower_bounds, reference.upper_bounds)
        assert mine.lower_bounds.keys() >= {1, 3, 4, 6, 7}  # ids, symbol, exchange, time, price: what scans prune by


@pytest.mark.parametrize("mode", [None, "full", "truncate(2)", "counts", "none"])
def test_a_column_of_one_value_has_pyicebergs_metrics_without_parquet_statistics(
    k2_home: Path, tmp_path: Path, mode: str | None
) -> None:
    """The writer takes the bounds of a dictionary column of one value (a file's symbol, the
    currency) from that value instead of Parquet statistics, under any metrics mode."""
    generated = write_asx_trades_day(tmp_path / "asx", rows=3_000, malformed=0)
    encoded = min(
        (
            file_day
            for file_day in trade_file_days(generated.data_dir, generated.day.isoformat())
            if file_day.rows.num_rows
        ),
        key=lambda file_day: (file_day.path.name, file_day.first_line),
    ).rows
    table = IcebergResource().trades()
    if mode:
        with table.transaction() as transaction:
            transaction.set_properties(
                {"write.metadata.metrics.column.symbol": mode, "write.metadata.metrics.column.currency": mode}
            )
        table = IcebergResource().trades()
    metadata = table.metadata
    schema = metadata.schema().as_arrow()
    ours = [
        data_file_writer(table.io, metadata)(task)
        for task in file_write_tasks(metadata, in_table_schema(encoded, schema), uuid.uuid4(), iter(range(100)))
    ]
    decoded = in_table_schema(encoded.cast(TRADES.arrow_schema()), schema)
    theirs = list(
        write_file(table.io, metadata, iter(file_write_tasks(metadata, decoded, uuid.uuid4(), iter(range(100)))))
    )
    assert len(ours) == len(theirs) >= 1  # one per UTC day the rows fall in
    symbol_id = metadata.schema().find_field("symbol").field_id
    for mine, reference in zip(ours, theirs):
        assert (mine.value_counts, mine.null_value_counts) == (reference.value_counts, reference.null_value_counts)
        assert (mine.lower_bounds, mine.upper_bounds) == (reference.lower_bounds, reference.upper_bounds)
        assert (symbol_id in mine.lower_bounds) == (mode not in ("counts", "none"))
        parquet = pq.read_metadata(urlparse(mine.file_path).path)
        names = [parquet.row_group(0).column(index).path_in_schema for index in range(parquet.num_columns)]
        assert (
            not parquet.row_group(0).column(names.index("symbol")).is_stats_set
        )  # the value, not Parquet's statistics
