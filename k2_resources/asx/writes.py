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
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from dataclasses import field as dataclass_field
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import And, BooleanExpression, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import (
    MetricModeTypes,
    MetricsMode,
    StatsAggregator,
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
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Operation
from pyiceberg.transforms import DayTransform, Transform
from pyiceberg.typedef import Record
from pyiceberg.types import IcebergType, TimestampType, TimestamptzType
from pyiceberg.utils.properties import property_as_int

from k2_resources.asx.columnar_trades import ENCODED_SCHEMA, ColumnarDeclined, FileDay, assemble_day, trade_file_days
from k2_resources.asx.files import Kind, read_raw_day
from k2_resources.asx.normalise import DEAD_LETTER_SOURCE, EXCHANGE, NORMALISERS, NormalisedDay, check_against_model
from k2_resources.asx.sydney_time import local_day_bounds_utc
from k2_resources.catalog.resource import IcebergResource


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


_MICROS_PER_DAY = 86_400_000_000


def partition_values(transform: Transform, source_type: IcebergType, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """``transform`` applied to ``column``: the partition values of its rows.

    The day of a microsecond timestamp is a floor division here, as the Iceberg spec and Iceberg
    Java's ``DateTimeUtil.microsToDays`` define it (pyiceberg's ``pyarrow_transform`` gives the
    same days from 1970 on; it takes about 0.2 s per million rows, which made splitting a
    10M-row day by partition cost 1.8 s)."""
    if (
        isinstance(transform, DayTransform)
        and isinstance(source_type, (TimestampType, TimestamptzType))
        and pa.types.is_timestamp(column.type)
        and column.type.unit == "us"
        and column.null_count == 0
    ):
        return pa.chunked_array(
            [
                pa.array(np.floor_divide(chunk.cast(pa.int64()).to_numpy(), _MICROS_PER_DAY).astype(np.int32))
                for chunk in column.chunks
            ],
            type=pa.int32(),
        )
    return transform.pyarrow_transform(source_type)(column)


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
        transformed[f"p{index}"] = partition_values(field.transform, source.field_type, column)
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
                field_values=[
                    PartitionFieldValue(field=field, value=value) for field, value in zip(spec.fields, values)
                ],
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
        return field.with_type(
            pa.map_(_decoded_field(kind.key_field), _decoded_field(kind.item_field), kind.keys_sorted)
        )
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
        return target.with_type(
            pa.map_(
                _encoded_as(want.key_field, have.key_field),
                _encoded_as(want.item_field, have.item_field),
                want.keys_sorted,
            )
        )
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
    return rows.cast(
        pa.schema(
            [_encoded_as(want, have) for want, have in zip(table_schema, rows.schema)], metadata=table_schema.metadata
        )
    )


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
        transaction.delete(
            delete_filter=row_filter, snapshot_properties=properties, _isolation_operation=Operation.OVERWRITE
        )
        target = property_as_int(
            metadata.properties,
            TableProperties.WRITE_TARGET_FILE_SIZE_BYTES,
            TableProperties.WRITE_TARGET_FILE_SIZE_BYTES_DEFAULT,
        )
        task_schema = pyarrow_to_schema(
            decoded_schema(rows.schema),
            name_mapping=metadata.schema().name_mapping,
            format_version=metadata.format_version,
        )
        with transaction.update_snapshot(snapshot_properties=properties).fast_append() as append:
            counter = itertools.count(0)
            tasks = [
                WriteTask(
                    write_uuid=append.commit_uuid,
                    task_id=next(counter),
                    record_batches=batches,
                    partition_key=key,
                    schema=task_schema,
                )
                for key, piece in pieces
                for batches in bin_pack_arrow_table(piece, target)  # type: ignore[arg-type]
            ]
            direct = (
                metadata.schema().as_arrow() == decoded_schema(rows.schema)
                and metadata.spec().spec_id == metadata.default_spec_id
            )
            if not direct and rows.schema != decoded_schema(rows.schema):
                # pyiceberg's writer projects each batch to the table's schema: give it plain columns.
                tasks = [
                    WriteTask(
                        write_uuid=task.write_uuid,
                        task_id=task.task_id,
                        partition_key=task.partition_key,
                        schema=task.schema,
                        record_batches=pa.Table.from_batches(task.record_batches)
                        .cast(decoded_schema(rows.schema))
                        .to_batches(),
                    )
                    for task in tasks
                ]
            written = (
                _write_data_files(table.io, metadata, tasks) if direct else write_file(table.io, metadata, iter(tasks))
            )
            for data_file in written:
                append.append_data_file(data_file)


# Parquet encodings for columns that are unique per row and ordered within a file: a message or
# trade id shares its prefix with the one before it (DELTA_BYTE_ARRAY), times and line numbers
# rise (DELTA_BINARY_PACKED). A dictionary never fits such columns, so pyarrow's default tries
# one per row group and gives up: the deltas write 3x smaller files, faster.
_DELTA_ENCODINGS = {
    "DELTA_BYTE_ARRAY": ("message_id", "trade_id", "quote_id"),
    "DELTA_BINARY_PACKED": ("timestamp", "source_sequence"),
}


def _leaf_paths(field: pa.Field) -> list[str]:
    """The Parquet column paths of ``field``'s leaves, as pyarrow names them."""
    kind = field.type
    if pa.types.is_map(kind):
        return [
            f"{field.name}.key_value.{path}"
            for child in (kind.key_field, kind.item_field)
            for path in _leaf_paths(child)
        ]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return [f"{field.name}.list.{path}" for path in _leaf_paths(kind.value_field.with_name("element"))]
    if pa.types.is_struct(kind):
        return [f"{field.name}.{path}" for child in kind for path in _leaf_paths(child)]
    return [field.name]


def _collection_leaf_nulls(rows: pa.Table, field: pa.Field) -> list[int]:
    """Parquet's null count of each leaf of ``field``, a top-level list or map of primitives: the
    null entries plus one per row whose list or map is null or empty (each such row is a level
    below the leaf's, which Parquet counts as a null value)."""
    is_map = pa.types.is_map(field.type)
    nulls = [0, 0] if is_map else [0]
    for chunk in rows.column(field.name).chunks:
        offsets = chunk.offsets.to_numpy()  # of this chunk's slice; the children are not sliced
        empty_rows = int(np.count_nonzero(np.diff(offsets) == 0))
        first, last = int(offsets[0]), int(offsets[-1])
        for leaf, entries in enumerate([chunk.keys, chunk.items] if is_map else [chunk.values]):
            nulls[leaf] += entries.slice(first, last - first).null_count + empty_rows
    return nulls


def _is_collection_of_primitives(field: pa.Field) -> bool:
    kind = field.type
    if pa.types.is_map(kind):
        return not pa.types.is_nested(kind.key_type) and not pa.types.is_nested(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return not pa.types.is_nested(kind.value_type)
    return False


def _single_text(column: pa.ChunkedArray) -> str | None:
    """The one value of a dictionary-encoded text column that holds nothing else (no nulls)."""
    kind = column.type
    if not pa.types.is_dictionary(kind) or not (
        pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
    ):
        return None
    values = {
        chunk.dictionary[0].as_py() if len(chunk.dictionary) == 1 else None for chunk in column.chunks if len(chunk)
    }
    if len(values) != 1 or None in values or column.null_count:
        return None
    return values.pop()


def _data_file_writer(io: FileIO, metadata: TableMetadata) -> Callable[[WriteTask], DataFile]:
    """What pyiceberg's ``write_file`` does for one task whose rows are already in the table's
    Arrow schema (no per-batch schema projection), with the table's Parquet properties plus
    delta encodings for the per-row unique columns; statistics come from pyiceberg."""
    file_schema = metadata.schema()
    arrow_schema = file_schema.as_arrow()
    encodings = {
        column: encoding
        for encoding, columns in _DELTA_ENCODINGS.items()
        for column in columns
        if column in arrow_schema.names
    }
    # Iceberg keeps no bounds for values inside lists and maps (neither pyiceberg nor Iceberg Java's
    # ParquetUtil: "we allow struct nesting, but not maps or arrays"), so their Parquet statistics,
    # an eighth of the write's time, are not computed; value and null counts come from the file's
    # level counts and the rows (tests/integration/test_asx_pipelined_write.py holds them to pyiceberg's).
    collections = [field for field in arrow_schema if _is_collection_of_primitives(field)]
    collection_paths = {path for field in collections for path in _leaf_paths(field)}
    column_ids = parquet_path_to_id_mapping(file_schema)
    statistics_plan = compute_statistics_plan(file_schema, metadata.properties)
    for leaf in collection_paths:
        statistics_plan[column_ids[leaf]] = replace(
            statistics_plan[column_ids[leaf]], mode=MetricsMode(MetricModeTypes.NONE)
        )
    writer_options = {
        **_get_parquet_writer_kwargs(metadata.properties),
        # Every leaf, nested ones included (a map's keys and values, a list's elements): pyarrow
        # matches these by full path, and a map column written without its dictionary costs 1.6x.
        "use_dictionary": [
            path for field in arrow_schema if field.name not in encodings for path in _leaf_paths(field)
        ],
        "write_statistics": [
            path for field in arrow_schema for path in _leaf_paths(field) if path not in collection_paths
        ],
        "column_encoding": encodings,
        "store_decimal_as_integer": True,
        # No Arrow schema in the footer: columns written from dictionary arrays read back as the plain
        # strings of the Parquet schema, as the files of any other Iceberg writer do.
        "store_schema": False,
    }
    row_group_limit = property_as_int(
        metadata.properties, TableProperties.PARQUET_ROW_GROUP_LIMIT, TableProperties.PARQUET_ROW_GROUP_LIMIT_DEFAULT
    )
    locations = load_location_provider(table_location=metadata.location, table_properties=metadata.properties)

    def write(task: WriteTask) -> DataFile:
        rows = pa.Table.from_batches(task.record_batches)
        path = locations.new_data_location(
            data_file_name=task.generate_data_file_filename("parquet"), partition_key=task.partition_key
        )
        # A column of one value (a file's symbol, the exchange, the currency) has that value for
        # its bounds: Parquet's statistics would hash every row of it to find out.
        single = (
            {name: text for name in arrow_schema.names if (text := _single_text(rows.column(name))) is not None}
            if rows.num_rows
            else {}
        )
        options = {
            **writer_options,
            "write_statistics": [leaf for leaf in writer_options["write_statistics"] if leaf not in single],
        }
        output = io.new_output(path)
        with output.create(overwrite=True) as stream:
            writer = pq.ParquetWriter(stream, schema=rows.schema, **options)
            writer.write(rows, row_group_size=row_group_limit)
            writer.close()
        parquet_metadata = writer.writer.metadata
        # The columns written without statistics are filled in below (pyiceberg would warn about each).
        unread = {
            column_ids[name]: replace(statistics_plan[column_ids[name]], mode=MetricsMode(MetricModeTypes.NONE))
            for name in single
        }
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=parquet_metadata,
            stats_columns={**statistics_plan, **unread},
            parquet_column_mapping=column_ids,
        )
        groups = [parquet_metadata.row_group(group) for group in range(parquet_metadata.num_row_groups)]
        positions = (
            {groups[0].column(index).path_in_schema: index for index in range(parquet_metadata.num_columns)}
            if groups
            else {}
        )

        def values_in_file(path: str) -> int:  # the leaf's value count over the row groups, as Parquet keeps it
            return sum(group.column(positions[path]).num_values for group in groups)

        for field in collections:
            for leaf, nulls in zip(_leaf_paths(field), _collection_leaf_nulls(rows, field)):
                statistics.value_counts[column_ids[leaf]] = values_in_file(leaf)
                statistics.null_value_counts[column_ids[leaf]] = nulls
        for name, text in single.items():  # what pyiceberg makes of the statistics Parquet would have kept
            plan = statistics_plan[column_ids[name]]
            if plan.mode.type == MetricModeTypes.NONE:
                continue
            statistics.value_counts[column_ids[name]] = values_in_file(name)
            statistics.null_value_counts[column_ids[name]] = 0
            if plan.mode.type != MetricModeTypes.COUNTS:
                bounds = StatsAggregator(plan.iceberg_type, "BYTE_ARRAY", plan.mode.length)
                bounds.update_min(text)
                bounds.update_max(text)
                statistics.column_aggregates[column_ids[name]] = bounds
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

    return write


def _write_data_files(io: FileIO, metadata: TableMetadata, tasks: list[WriteTask]) -> list[DataFile]:
    """The tasks' data files (see :func:`_data_file_writer`), written in parallel."""
    write = _data_file_writer(io, metadata)
    if len(tasks) < 2:
        return [write(task) for task in tasks]
    with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:
        return list(pool.map(write, tasks))


def _retrying(load_table: Callable[[], Table], commit: Callable[[Table], None], attempts: int) -> Table:
    """``commit`` against a freshly loaded table, again (after a short random backoff) when it lost
    a race with another writer (a neighbouring day in the same backfill)."""
    for attempt in range(attempts):
        table: Table = load_table()
        try:
            with warnings.catch_warnings():
                # The first load of a day deletes nothing; pyiceberg warns about that, harmlessly.
                warnings.filterwarnings("ignore", message="Delete operation did not match any records")
                commit(table)
            return table
        except (CommitFailedException, ValidationException):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


def replace_rows(
    load_table: Callable[[], Table],
    rows: pa.Table,
    row_filter: BooleanExpression,
    properties: dict[str, str],
    attempts: int = 5,
) -> Table:
    """Delete the rows matching ``row_filter`` and append ``rows`` in one Iceberg transaction."""
    return _retrying(
        load_table,
        lambda table: _overwrite(table, in_table_schema(rows, table.schema().as_arrow()), row_filter, properties),
        attempts,
    )


class _TableChanged(Exception):
    """The table's schema or partition spec changed after its data files were written."""


def replace_with_files(
    load_table: Callable[[], Table],
    written_for: TableMetadata,
    data_files: list[DataFile],
    row_filter: BooleanExpression,
    properties: dict[str, str],
    attempts: int = 5,
) -> Table:
    """Delete the rows matching ``row_filter`` and add ``data_files`` (written for the table as
    ``written_for`` describes it) in one Iceberg transaction. Raises _TableChanged when the
    table's schema or spec is no longer the one the files were written with."""

    def commit(table: Table) -> None:
        metadata = table.metadata
        if (metadata.current_schema_id, metadata.default_spec_id) != (
            written_for.current_schema_id,
            written_for.default_spec_id,
        ):
            raise _TableChanged(table.name())
        with table.transaction() as transaction:
            # As Transaction.overwrite does: the delete validates against concurrent writers as an overwrite.
            transaction.delete(
                delete_filter=row_filter, snapshot_properties=properties, _isolation_operation=Operation.OVERWRITE
            )
            with transaction.update_snapshot(snapshot_properties=properties).fast_append() as append:
                for data_file in data_files:
                    append.append_data_file(data_file)

    return _retrying(load_table, commit, attempts)


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


def _file_write_tasks(
    metadata: TableMetadata,
    rows: pa.Table,
    write_uuid: uuid.UUID,
    task_ids: Iterator[int],
    rows_per_file: int = _ROWS_PER_DATA_FILE,
) -> list[WriteTask] | None:
    """One part's rows as write tasks per partition of at most ``rows_per_file`` rows; None when
    the rows are not grouped by partition."""
    if rows.num_rows == 0:
        return []
    pieces: list[tuple[PartitionKey | None, pa.Table]] | None
    pieces = [(None, rows)] if metadata.spec().is_unpartitioned() else partition_slices(metadata, rows)
    if pieces is None:
        return None
    tasks = []
    schema = metadata.schema()
    for key, piece in pieces:
        parts = -(-piece.num_rows // rows_per_file)
        size = -(-piece.num_rows // parts)
        for start in range(0, piece.num_rows, size):
            tasks.append(
                WriteTask(
                    write_uuid=write_uuid,
                    task_id=next(task_ids),
                    schema=schema,
                    partition_key=key,
                    record_batches=piece.slice(start, size).to_batches(),
                )
            )
    return tasks


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
    write = _data_file_writer(table.io, metadata)
    write_uuid, task_ids = uuid.uuid4(), itertools.count()
    file_days: list[FileDay] = []
    writes: list[Future[DataFile]] = []

    def remove_written() -> None:  # data files no snapshot references
        for future in writes:
            if future.done() and future.exception() is None:
                table.io.delete(future.result().file_path)

    def submit(rows: pa.Table, path: Path, rows_per_file: int = _ROWS_PER_DATA_FILE) -> None:
        tasks = _file_write_tasks(metadata, rows, write_uuid, task_ids, rows_per_file)
        if tasks is None:
            raise ColumnarDeclined(f"the rows of {path.name} are not grouped by partition")
        writes.extend(writers.submit(write, task) for task in tasks)

    try:
        with ThreadPoolExecutor(max_workers=2) as writers:
            # Each part's rows wait for the next part before they are written: the last part's
            # are then split in two, so both writers finish it instead of one (the day's last
            # half second ran on one core).
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
    except _TableChanged:  # the files no longer fit the table: write the rows again against it
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
