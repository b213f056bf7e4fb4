"""Writing one ASX trading day to Iceberg: the day's rows and dead letters replace the old ones.

The write replaces exactly one trading day. A Sydney day spans two UTC days, so the write
deletes the rows of ``exchange = 'ASX'`` in ``[local midnight, next local midnight)``
expressed in UTC and appends the day's rows, in one transaction; a whole-partition overwrite
would wipe the neighbouring day's rows sharing the UTC partition.
"""

from __future__ import annotations

import itertools
import os
import random
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field as dataclass_field
from datetime import date
from pathlib import Path
from typing import Callable

import polars as pl
import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
import pyarrow.parquet as pq
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import (
    _get_parquet_writer_kwargs,
    bin_pack_arrow_table,
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
    pyarrow_to_schema,
    write_file,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.partitioning import PartitionFieldValue, PartitionKey
from pyiceberg.typedef import Record
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Operation
from pyiceberg.utils.properties import property_as_int

from k2_resources.asx.columnar_trades import normalise_trade_files
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


def _decoded_field(field: pa.Field) -> pa.Field:
    """``field`` with every dictionary (at any depth) replaced by its value type."""
    kind = field.type
    if pa.types.is_dictionary(kind):
        return field.with_type(kind.value_type)
    if pa.types.is_map(kind):
        return field.with_type(pa.map_(_decoded_field(kind.key_field), _decoded_field(kind.item_field), kind.keys_sorted))
    if pa.types.is_large_list(kind):
        return field.with_type(pa.large_list(_decoded_field(kind.value_field)))
    if pa.types.is_list(kind):
        return field.with_type(pa.list_(_decoded_field(kind.value_field)))
    if pa.types.is_struct(kind):
        return field.with_type(pa.struct([_decoded_field(child) for child in kind]))
    return field


def decoded_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` as it reads once dictionary-encoded columns are decoded."""
    return pa.schema([_decoded_field(field) for field in schema], metadata=schema.metadata)


def _encoded_as(target: pa.Field, source: pa.Field) -> pa.Field:
    """The table's ``target`` field (its type and field ids), dictionary-encoded wherever ``source`` is."""
    have, want = source.type, target.type
    if pa.types.is_dictionary(have):
        return target.with_type(pa.dictionary(have.index_type, want))
    if pa.types.is_map(have) and pa.types.is_map(want):
        return target.with_type(pa.map_(_encoded_as(want.key_field, have.key_field),
                                        _encoded_as(want.item_field, have.item_field), want.keys_sorted))
    if pa.types.is_large_list(have) and pa.types.is_large_list(want):
        return target.with_type(pa.large_list(_encoded_as(want.value_field, have.value_field)))
    if pa.types.is_list(have) and pa.types.is_list(want):
        return target.with_type(pa.list_(_encoded_as(want.value_field, have.value_field)))
    if pa.types.is_struct(have) and pa.types.is_struct(want) and have.num_fields == want.num_fields:
        return target.with_type(pa.struct([_encoded_as(w, h) for w, h in zip(want, have)]))
    return target


def in_table_schema(rows: pa.Table, table_schema: pa.Schema) -> pa.Table:
    """``rows`` cast to the table's Arrow schema (the catalog assigns field ids when it creates a
    table; files are written with the table's own); dictionary-encoded columns stay encoded."""
    if rows.schema.names != table_schema.names:
        return rows.cast(table_schema)  # the cast names the mismatch
    return rows.cast(pa.schema([_encoded_as(want, have) for want, have in zip(table_schema, rows.schema)],
                               metadata=table_schema.metadata))


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
        task_schema = pyarrow_to_schema(decoded_schema(rows.schema), name_mapping=metadata.schema().name_mapping,
                                        format_version=metadata.format_version)
        with transaction.update_snapshot(snapshot_properties=properties).fast_append() as append:
            counter = itertools.count(0)
            tasks = [
                WriteTask(write_uuid=append.commit_uuid, task_id=next(counter), record_batches=batches,
                          partition_key=key, schema=task_schema)
                for key, piece in pieces
                for batches in bin_pack_arrow_table(piece, target)  # type: ignore[arg-type]
            ]
            direct = metadata.schema().as_arrow() == decoded_schema(rows.schema) and metadata.spec().spec_id == metadata.default_spec_id
            if not direct and rows.schema != decoded_schema(rows.schema):
                # pyiceberg's writer projects each batch to the table's schema: give it plain columns.
                tasks = [WriteTask(write_uuid=task.write_uuid, task_id=task.task_id, partition_key=task.partition_key,
                                   schema=task.schema, record_batches=pa.Table.from_batches(task.record_batches)
                                   .cast(decoded_schema(rows.schema)).to_batches())
                         for task in tasks]
            written = _write_data_files(table.io, metadata, tasks) if direct else write_file(table.io, metadata, iter(tasks))
            for data_file in written:
                append.append_data_file(data_file)


# Parquet encodings for columns that are unique per row and ordered within a file: a message or
# trade id shares its prefix with the one before it (DELTA_BYTE_ARRAY), times and line numbers
# rise (DELTA_BINARY_PACKED). A dictionary never fits such columns, so pyarrow's default tries
# one per row group and gives up: the deltas write 3x smaller files, faster.
_DELTA_ENCODINGS = {"DELTA_BYTE_ARRAY": ("message_id", "trade_id", "quote_id"),
                    "DELTA_BINARY_PACKED": ("timestamp", "source_sequence")}


def _write_data_files(io: FileIO, metadata: TableMetadata, tasks: list[WriteTask]) -> list[DataFile]:
    """pyiceberg's ``write_file`` for rows already in the table's Arrow schema (no per-batch schema
    projection), with the table's Parquet properties plus delta encodings for the per-row unique
    columns; the files are written in parallel, and their statistics come from pyiceberg."""
    file_schema = metadata.schema()
    names = set(file_schema.as_arrow().names)
    encodings = {column: encoding for encoding, columns in _DELTA_ENCODINGS.items() for column in columns if column in names}
    writer_options = {
        **_get_parquet_writer_kwargs(metadata.properties),
        "use_dictionary": sorted(names - set(encodings)),
        "column_encoding": encodings,
        "store_decimal_as_integer": True,
        # No Arrow schema in the footer: columns written from dictionary arrays read back as the plain
        # strings of the Parquet schema, as the files of any other Iceberg writer do.
        "store_schema": False,
    }
    row_group_limit = property_as_int(metadata.properties, TableProperties.PARQUET_ROW_GROUP_LIMIT,
                                      TableProperties.PARQUET_ROW_GROUP_LIMIT_DEFAULT)
    locations = load_location_provider(table_location=metadata.location, table_properties=metadata.properties)

    def write(task: WriteTask) -> DataFile:
        rows = pa.Table.from_batches(task.record_batches)
        path = locations.new_data_location(data_file_name=task.generate_data_file_filename("parquet"),
                                           partition_key=task.partition_key)
        output = io.new_output(path)
        with output.create(overwrite=True) as stream:
            writer = pq.ParquetWriter(stream, schema=rows.schema, **writer_options)
            writer.write(rows, row_group_size=row_group_limit)
            writer.close()
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=writer.writer.metadata,
            stats_columns=compute_statistics_plan(file_schema, metadata.properties),
            parquet_column_mapping=parquet_path_to_id_mapping(file_schema),
        )
        return DataFile.from_args(
            content=DataFileContent.DATA,
            file_path=path,
            file_format=FileFormat.PARQUET,
            partition=task.partition_key.partition if task.partition_key else Record(),
            file_size_in_bytes=len(output),
            sort_order_id=None,
            spec_id=metadata.default_spec_id,
            equality_ids=None,
            key_metadata=None,
            **statistics.to_serialized_dict(),
        )

    if len(tasks) < 2:
        return [write(task) for task in tasks]
    with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:
        return list(pool.map(write, tasks))


def replace_rows(
    load_table: Callable[[], Table], rows: pa.Table, row_filter: BooleanExpression, properties: dict[str, str], attempts: int = 5
) -> Table:
    """Delete the rows matching ``row_filter`` and append ``rows`` in one Iceberg transaction.

    ``load_table`` is called for every attempt, so a commit that lost a race with another
    writer (a neighbouring day in the same backfill) is redone against the new snapshot.
    """
    for attempt in range(attempts):
        table: Table = load_table()
        rows = in_table_schema(rows, table.schema().as_arrow())
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
    seconds: dict[str, float] = dataclass_field(default_factory=dict)  # wall time of "read_and_validate" and "write"


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
    """CSV -> validated V2 rows -> Iceberg for one trading day (what the assets and the benchmark run).

    Trades are read column-wise from the files (:mod:`.columnar_trades`): the same rows and dead
    letters as normalising the day's lines, several times faster on a large day. ``raw``, the
    day's lines as :func:`read_raw_day` gives them (the raw asset's output), is what the general
    path normalises: quotes, and trades in files the column-wise reader declines."""
    started = time.perf_counter()
    columnar = normalise_trade_files(data_dir, partition_key) if kind == "trades" else None
    if columnar is not None:
        raw_rows, day = columnar
    else:
        if raw is None:
            raw = read_raw_day(data_dir, kind, partition_key)
        raw_rows, day = raw.num_rows, NORMALISERS[kind](raw, partition_key)
    check_against_model(day.rows, kind)
    validated = time.perf_counter()
    snapshot_id = write_day(iceberg, kind, partition_key, day)
    seconds = {"read_and_validate": round(validated - started, 3), "write": round(time.perf_counter() - validated, 3)}
    return IngestResult(kind, partition_key, raw_rows, day.valid, day.rejected, rows_per_symbol(day.rows), snapshot_id,
                        seconds)
