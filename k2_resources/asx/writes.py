"""Writing one ASX trading day to Iceberg: the day's rows and dead letters replace the old ones.

The write replaces exactly one trading day. A Sydney day spans two UTC days, so the write
deletes the rows of ``exchange = 'ASX'`` in ``[local midnight, next local midnight)``
expressed in UTC and appends the day's rows, in one transaction; a whole-partition overwrite
would wipe the neighbouring day's rows sharing the UTC partition. The generic half (partition
splits, data files, the replace commit) is in :mod:`k2_resources.catalog`.
"""

from __future__ import annotations

import itertools
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pyarrow as pa
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table

from k2_resources.asx.columnar_trades import ENCODED_SCHEMA, ColumnarDeclined, FileDay, assemble_day, trade_file_days
from k2_resources.asx.files import Kind, read_raw_day
from k2_resources.asx.normalise import DEAD_LETTER_SOURCE, EXCHANGE, NORMALISERS, NormalisedDay, check_against_model
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.catalog.data_files import data_file_writer, file_write_tasks
from k2_resources.catalog.errors import TableChangedError
from k2_resources.catalog.partitioning import in_table_schema
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.writes import replace_rows, replace_with_files


def day_filter(day: date | str) -> BooleanExpression:
    """exchange = 'ASX' and timestamp in [local midnight, next local midnight) as UTC."""
    start, end = local_day_bounds_utc(day)
    exchange = EqualTo(term="exchange", value=EXCHANGE)
    after = GreaterThanOrEqual(term="timestamp", value=start.isoformat())
    before = LessThan(term="timestamp", value=end.isoformat())
    return And(exchange, And(after, before))


def dead_letter_filter(source: str, partition_key: str) -> BooleanExpression:
    return And(EqualTo(term="source", value=source), EqualTo(term="partition_key", value=partition_key))


@dataclass(frozen=True)
class IngestResult:
    """What one day's ingest of one kind did."""

    kind: Kind
    partition_key: str
    raw_rows: int
    valid: int
    rejected: int
    rows_per_symbol: dict[str, int]
    snapshot_id: int | None
    seconds: dict[str, float] = dataclass_field(default_factory=dict)  # wall time of "read_and_validate" and "write"


def _replace_dead_letters(iceberg: IcebergResource, kind: Kind, partition_key: str, day: NormalisedDay) -> None:
    source = DEAD_LETTER_SOURCE[kind]
    replace_rows(
        iceberg.dead_letters,
        day.dead_letters,
        dead_letter_filter(source, partition_key),
        {"k2.source": source, "k2.partition": partition_key, "k2.rows": str(day.rejected)},
    )


def _day_properties(kind: Kind, partition_key: str, day: NormalisedDay) -> dict[str, str]:
    return {"k2.source": DEAD_LETTER_SOURCE[kind], "k2.partition": partition_key, "k2.rows": str(day.valid)}


def _snapshot_id(table: Table) -> int | None:
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None


def write_day(iceberg: IcebergResource, kind: Kind, partition_key: str, day: NormalisedDay) -> int | None:
    """Replace one trading day in market.trades/quotes and its dead letters; the new snapshot id."""
    _replace_dead_letters(iceberg, kind, partition_key, day)
    table = replace_rows(
        iceberg.trades if kind == "trades" else iceberg.quotes,
        day.rows,
        day_filter(partition_key),
        _day_properties(kind, partition_key, day),
    )
    return _snapshot_id(table)


def rows_per_symbol(rows: pa.Table) -> dict[str, int]:
    counts = pl.from_arrow(rows.select(["symbol"])).group_by("symbol").len().sort("symbol")  # type: ignore[union-attr]
    return dict(zip(counts["symbol"].to_list(), counts["len"].to_list()))


# A part's rows are written as data files of at most this many rows, so the two writer threads
# share a day's work evenly (a part of a file is about 1.2M rows: usually one data file each).
_ROWS_PER_DATA_FILE = 2_000_000
# Rows below which the day's last part is written as one file (splitting it gains nothing).
_MIN_ROWS_PER_SPLIT = 100_000


def _ingest_trades_pipelined(
    data_dir: Path, iceberg: IcebergResource, partition_key: str
) -> tuple[int, NormalisedDay, int | None, dict[str, float], dict[str, int]] | None:
    """Trades read part by part (:func:`trade_file_days`), each part's rows written to Parquet while
    the next parts are read, all committed at the end in one transaction with the day's delete.
    None when a file needs the general path or the table's columns or spec are not the V2 ones."""
    started = time.perf_counter()
    ingested_at = datetime.now(UTC)
    table = iceberg.trades()
    metadata = table.metadata
    table_schema = metadata.schema().as_arrow()
    if table_schema.names != ENCODED_SCHEMA.names or metadata.spec().spec_id != metadata.default_spec_id:
        return None
    write = data_file_writer(table.io, metadata)
    write_uuid, task_ids = uuid.uuid4(), itertools.count()
    file_days: list[FileDay] = []
    writes: list[Future[DataFile]] = []

    def remove_written() -> None:  # data files no snapshot references
        for future in writes:
            if future.done() and future.exception() is None:
                table.io.delete(future.result().file_path)

    def submit(rows: pa.Table, path: Path, rows_per_file: int = _ROWS_PER_DATA_FILE) -> None:
        tasks = file_write_tasks(metadata, rows, write_uuid, task_ids, rows_per_file)
        if tasks is None:
            raise ColumnarDeclined(f"the rows of {path.name} are not grouped by partition")
        writes.extend(writers.submit(write, task) for task in tasks)

    try:
        with ThreadPoolExecutor(max_workers=2) as writers:
            # Each part's rows wait for the next part before they are written: the last part's
            # are then split in two, so both writers finish it instead of one.
            held: tuple[pa.Table, Path] | None = None
            for file_day in trade_file_days(data_dir, partition_key, ingested_at):
                if file_day.first_line == 0:  # the model check guards the code, not the data: once per file
                    check_against_model(file_day.rows, "trades")
                file_days.append(file_day)
                if held is not None:
                    submit(*held)
                held = (in_table_schema(file_day.rows, table_schema), file_day.path)
            if held is not None:
                submit(*held, rows_per_file=max(held[0].num_rows // 2 + 1, _MIN_ROWS_PER_SPLIT))
            validated = time.perf_counter()
            day = assemble_day(file_days, partition_key, ingested_at)
            # The dead letters are committed while the last data files are still being written.
            _replace_dead_letters(iceberg, "trades", partition_key, day)
            data_files = [future.result() for future in writes]
    except ColumnarDeclined:
        remove_written()
        return None
    except BaseException:
        remove_written()
        raise
    lines_of_day = sum(file_day.lines_of_day for file_day in file_days)
    properties = _day_properties("trades", partition_key, day)
    try:
        table = replace_with_files(iceberg.trades, metadata, data_files, day_filter(partition_key), properties)
    except TableChangedError:  # the files no longer fit the table: write the rows again against it
        remove_written()
        table = replace_rows(iceberg.trades, day.rows, day_filter(partition_key), properties)
    return lines_of_day, day, _snapshot_id(table), _phases(started, validated), _symbol_counts(file_days)


def _symbol_counts(file_days: list[FileDay]) -> dict[str, int]:
    """Rows per symbol: each part's rows are all of its file's symbol."""
    counts: dict[str, int] = {}
    for file_day in file_days:
        if file_day.rows.num_rows:
            counts[file_day.symbol] = counts.get(file_day.symbol, 0) + file_day.rows.num_rows
    return dict(sorted(counts.items()))


def _phases(started: float, validated: float) -> dict[str, float]:
    """Wall time of "read_and_validate" (until the last file is read) and "write" (the rest)."""
    return {"read_and_validate": round(validated - started, 3), "write": round(time.perf_counter() - validated, 3)}


def ingest_day(
    data_dir: Path, iceberg: IcebergResource, kind: Kind, partition_key: str, raw: pa.Table | None = None
) -> IngestResult:
    """CSV -> validated V2 rows -> Iceberg for one trading day (what the assets and the benchmark run).

    Trades are read column-wise from the files (:mod:`.columnar_trades`), and each file's rows are
    written while the next is read: the same rows and dead letters as normalising the day's lines,
    several times faster on a large day. ``raw``, the day's lines as :func:`read_raw_day` gives
    them (the raw asset's output), is what the general path normalises: quotes, and trades in
    files the column-wise reader declines."""
    if kind == "trades":
        pipelined = _ingest_trades_pipelined(data_dir, iceberg, partition_key)
        if pipelined is not None:
            raw_rows, day, snapshot_id, seconds, per_symbol = pipelined
            return IngestResult(
                kind, partition_key, raw_rows, day.valid, day.rejected, per_symbol, snapshot_id, seconds
            )
    started = time.perf_counter()
    if raw is None:
        raw = read_raw_day(data_dir, kind, partition_key)
    raw_rows, day = raw.num_rows, NORMALISERS[kind](raw, partition_key)
    check_against_model(day.rows, kind)
    validated = time.perf_counter()
    snapshot_id = write_day(iceberg, kind, partition_key, day)
    return IngestResult(
        kind,
        partition_key,
        raw_rows,
        day.valid,
        day.rejected,
        rows_per_symbol(day.rows),
        snapshot_id,
        _phases(started, validated),
    )
