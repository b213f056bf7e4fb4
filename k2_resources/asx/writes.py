"""Writing one ASX trading day to Iceberg: the day's rows and dead letters replace the old ones.

The write replaces exactly one trading day. A Sydney day spans two UTC days, so the write
deletes the rows of ``exchange = 'ASX'`` in ``[local midnight, next local midnight)``
expressed in UTC and appends the day's rows, in one transaction; a whole-partition overwrite
would wipe the neighbouring day's rows sharing the UTC partition.
"""

from __future__ import annotations

import itertools
import random
import time
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Callable, Iterator

import polars as pl
import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.io.pyarrow import bin_pack_arrow_table, pyarrow_to_schema, write_file
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Operation
from pyiceberg.utils.properties import property_as_int

from k2_resources.asx.files import Kind, read_raw_day
from k2_resources.asx.normalise import DEAD_LETTER_SOURCE, EXCHANGE, NORMALISERS, NormalisedDay, check_against_model
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.iceberg import IcebergResource


def day_filter(day: date | str) -> BooleanExpression:
    """exchange = 'ASX' and timestamp in [local midnight, next local midnight) as UTC."""
    start, end = local_day_bounds_utc(day)
    return And(
        EqualTo("exchange", EXCHANGE),
        And(GreaterThanOrEqual("timestamp", start.isoformat()), LessThan("timestamp", end.isoformat())),
    )


def dead_letter_filter(source: str, partition_key: str) -> BooleanExpression:
    return And(EqualTo("source", source), EqualTo("partition_key", partition_key))


# More runs of equal partition values than this: the rows are not grouped, let pyiceberg split them.
_MAX_PARTITION_RUNS = 10_000


def partition_slices(metadata: TableMetadata, rows: pa.Table) -> list[tuple[PartitionKey, pa.Table]] | None:
    """``rows`` split by the table's partition spec, each partition a concatenation of zero-copy
    slices; None when the table is unpartitioned or the rows are not grouped by partition.

    pyiceberg's own split filters the whole table once per partition (seconds per pass on a
    10M-row day, with its map and list columns); rows sorted by symbol then time come in a few
    runs per partition, so slicing the runs costs nothing. Partition values are computed with
    pyiceberg's own transforms, so the keys are the ones its write would give.
    """
    spec, schema = metadata.spec(), metadata.schema()
    if spec.is_unpartitioned() or rows.num_rows == 0:
        return None
    transformed = {}
    for index, field in enumerate(spec.fields):
        source = schema.find_field(field.source_id)
        column = rows.column(schema.find_column_name(field.source_id))
        transformed[f"p{index}"] = field.transform.pyarrow_transform(source.field_type)(column)
    keys = pl.from_arrow(pa.table(transformed))
    assert isinstance(keys, pl.DataFrame)
    changed = pl.any_horizontal([pl.col(name).ne_missing(pl.col(name).shift(1)) for name in keys.columns])
    starts = keys.select(pl.arg_where(changed.fill_null(True)))[:, 0].to_list()
    if len(starts) > _MAX_PARTITION_RUNS:
        return None
    bounds = list(zip(starts, starts[1:] + [rows.num_rows]))
    runs: dict[tuple, list[pa.Table]] = {}
    first_rows = keys[starts].rows()
    for values, (start, end) in zip(first_rows, bounds):
        runs.setdefault(values, []).append(rows.slice(start, end - start))
    return [
        (
            PartitionKey(
                field_values=[PartitionFieldValue(field=field, value=value) for field, value in zip(spec.fields, values)],
                partition_spec=spec,
                schema=schema,
            ),
            pa.concat_tables(pieces),
        )
        for values, pieces in runs.items()
    ]


def _overwrite(table: Table, rows: pa.Table, row_filter: BooleanExpression, properties: dict[str, str]) -> None:
    """``table.overwrite`` (delete ``row_filter``, append ``rows``, one transaction), splitting
    the rows into partitions by :func:`partition_slices` instead of pyiceberg's filter per
    partition; falls back to ``table.overwrite`` when that does not apply."""
    with table.transaction() as transaction:
        metadata = transaction.table_metadata
        pieces = partition_slices(metadata, rows)
        if pieces is None:
            transaction.overwrite(rows, overwrite_filter=row_filter, snapshot_properties=properties)
            return
        # As Transaction.overwrite does: the delete validates against concurrent writers as an overwrite.
        transaction.delete(delete_filter=row_filter, snapshot_properties=properties,
                           _isolation_operation=Operation.OVERWRITE)
        target = property_as_int(metadata.properties, TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
                                 TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT)
        task_schema = pyarrow_to_schema(rows.schema, name_mapping=metadata.schema().name_mapping,
                                        format_version=metadata.format_version)
        with transaction.update_snapshot(snapshot_properties=properties).fast_append() as append:
            counter = itertools.count(0)

            def tasks() -> Iterator[WriteTask]:
                for key, piece in pieces:
                    for batches in bin_pack_arrow_table(piece, target):  # type: ignore[arg-type]
                        yield WriteTask(write_uuid=append.commit_uuid, task_id=next(counter), record_batches=batches,
                                        partition_key=key, schema=task_schema)

            for data_file in write_file(table.io, metadata, tasks()):
                append.append_data_file(data_file)


def replace_rows(
    load_table: Callable[[], Table], rows: pa.Table, row_filter: BooleanExpression, properties: dict[str, str], attempts: int = 5
) -> Table:
    """Delete the rows matching ``row_filter`` and append ``rows`` in one Iceberg transaction.

    ``load_table`` is called for every attempt, so a commit that lost a race with another
    writer (a neighbouring day in the same backfill) is redone against the new snapshot.
    """
    for attempt in range(attempts):
        table: Table = load_table()
        # The catalog assigns field ids when it creates a table; write with the table's own.
        rows = rows.cast(table.schema().as_arrow())
        try:
            with warnings.catch_warnings():
                # The first load of a day deletes nothing; pyiceberg warns about that, harmlessly.
                warnings.filterwarnings("ignore", message="Delete operation did not match any records")
                _overwrite(table, rows, row_filter, properties)
            return table
        except (CommitFailedException, ValidationException):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


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


def write_day(iceberg: IcebergResource, kind: Kind, partition_key: str, day: NormalisedDay) -> int | None:
    """Replace one trading day in market.trades/quotes and its dead letters; the new snapshot id."""
    source = DEAD_LETTER_SOURCE[kind]
    properties = {"k2.source": source, "k2.partition": partition_key}
    replace_rows(
        iceberg.dead_letters,
        day.dead_letters,
        dead_letter_filter(source, partition_key),
        {**properties, "k2.rows": str(day.rejected)},
    )
    table = replace_rows(
        iceberg.trades if kind == "trades" else iceberg.quotes,
        day.rows,
        day_filter(partition_key),
        {**properties, "k2.rows": str(day.valid)},
    )
    snapshot = table.current_snapshot()
    return snapshot.snapshot_id if snapshot else None


def rows_per_symbol(rows: pa.Table) -> dict[str, int]:
    counts = pl.from_arrow(rows.select(["symbol"])).group_by("symbol").len().sort("symbol")  # type: ignore[union-attr]
    return dict(zip(counts["symbol"].to_list(), counts["len"].to_list()))


def ingest_day(data_dir: Path, iceberg: IcebergResource, kind: Kind, partition_key: str, raw: pa.Table | None = None) -> IngestResult:
    """CSV -> validated V2 rows -> Iceberg for one trading day (what the assets and the benchmark run)."""
    if raw is None:
        raw = read_raw_day(data_dir, kind, partition_key)
    day = NORMALISERS[kind](raw, partition_key)
    check_against_model(day.rows, kind)
    snapshot_id = write_day(iceberg, kind, partition_key, day)
    return IngestResult(kind, partition_key, raw.num_rows, day.valid, day.rejected, rows_per_symbol(day.rows), snapshot_id)
