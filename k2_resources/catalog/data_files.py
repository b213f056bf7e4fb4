"""Parquet data files for an Iceberg table, written by K2 rather than by pyiceberg's ``write_file``.

:func:`data_file_writer` does what pyiceberg's ``write_file`` does for one task whose rows are
already in the table's Arrow schema, with the table's Parquet properties plus delta encodings
for the per-row unique columns, and without the statistics Iceberg never keeps (bounds inside
lists and maps) or that a column's one value gives (a file's symbol). Statistics otherwise come
from pyiceberg, so the files' metadata is what pyiceberg would write
(tests/integration/test_asx_pipelined_write.py holds them to it).

:class:`WrittenRows` keeps the files of one commit written once for all its attempts.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import (
    MetricModeTypes,
    MetricsMode,
    StatisticsCollector,
    StatsAggregator,
    compute_statistics_plan,
    data_file_statistics_from_parquet_metadata,
    parquet_path_to_id_mapping,
)
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
from pyiceberg.partitioning import PartitionKey
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.locations import load_location_provider
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.typedef import Record
from pyiceberg.utils.properties import property_as_int

from k2_resources.catalog.partitioning import partition_slices
from k2_resources.catalog.pyiceberg_adapter import (
    check_schema_compatible,
    dataframe_to_data_files,
    parquet_writer_options,
)

# A task's rows are written as data files of at most this many rows by default.
ROWS_PER_DATA_FILE = 2_000_000

# Parquet encodings for columns that are unique per row and ordered within a file: a message or
# trade id shares its prefix with the one before it (DELTA_BYTE_ARRAY), times and line numbers
# rise (DELTA_BINARY_PACKED). A dictionary never fits such columns, so pyarrow's default tries
# one per row group and gives up: the deltas write smaller files, faster.
_DELTA_ENCODINGS = {
    "DELTA_BYTE_ARRAY": ("message_id", "trade_id", "quote_id"),
    "DELTA_BINARY_PACKED": ("timestamp", "source_sequence"),
}


def leaf_paths(field: pa.Field) -> list[str]:
    """The Parquet column paths of ``field``'s leaves, as pyarrow names them."""
    kind = field.type
    if pa.types.is_map(kind):
        return [
            f"{field.name}.key_value.{path}"
            for child in (kind.key_field, kind.item_field)
            for path in leaf_paths(child)
        ]
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return [f"{field.name}.list.{path}" for path in leaf_paths(kind.value_field.with_name("element"))]
    if pa.types.is_struct(kind):
        return [f"{field.name}.{path}" for child in kind for path in leaf_paths(child)]
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


def _writer_options(metadata: TableMetadata, arrow_schema: pa.Schema, collection_paths: set[str]) -> dict[str, Any]:
    """ParquetWriter options: the table's properties, delta encodings, dictionaries for the rest."""
    encodings = {
        column: encoding
        for encoding, columns in _DELTA_ENCODINGS.items()
        for column in columns
        if column in arrow_schema.names
    }
    return {
        **parquet_writer_options(metadata.properties),
        # Every leaf, nested ones included (a map's keys and values, a list's elements): pyarrow
        # matches these by full path, and a map column written without its dictionary is much slower.
        "use_dictionary": [path for field in arrow_schema if field.name not in encodings for path in leaf_paths(field)],
        "write_statistics": [
            path for field in arrow_schema for path in leaf_paths(field) if path not in collection_paths
        ],
        "column_encoding": encodings,
        "store_decimal_as_integer": True,
        # No Arrow schema in the footer: columns written from dictionary arrays read back as the plain
        # strings of the Parquet schema, as the files of any other Iceberg writer do.
        "store_schema": False,
    }


def _fill_statistics(
    statistics: Any,
    parquet_metadata: Any,
    rows: pa.Table,
    collections: list[pa.Field],
    single: dict[str, str],
    plans: dict[int, StatisticsCollector],
    column_ids: dict[str, int],
) -> None:
    """Counts (and bounds) of the columns written without Parquet statistics, as pyiceberg would
    have made them from those statistics."""
    groups = [parquet_metadata.row_group(group) for group in range(parquet_metadata.num_row_groups)]
    positions = (
        {groups[0].column(index).path_in_schema: index for index in range(parquet_metadata.num_columns)}
        if groups
        else {}
    )

    def values_in_file(path: str) -> int:  # the leaf's value count over the row groups, as Parquet keeps it
        return sum(group.column(positions[path]).num_values for group in groups)

    for field in collections:
        for leaf, nulls in zip(leaf_paths(field), _collection_leaf_nulls(rows, field)):
            statistics.value_counts[column_ids[leaf]] = values_in_file(leaf)
            statistics.null_value_counts[column_ids[leaf]] = nulls
    for name, text in single.items():
        plan = plans[column_ids[name]]
        if plan.mode.type == MetricModeTypes.NONE:
            continue
        statistics.value_counts[column_ids[name]] = values_in_file(name)
        statistics.null_value_counts[column_ids[name]] = 0
        if plan.mode.type != MetricModeTypes.COUNTS:
            bounds = StatsAggregator(plan.iceberg_type, "BYTE_ARRAY", plan.mode.length)
            bounds.update_min(text)
            bounds.update_max(text)
            statistics.column_aggregates[column_ids[name]] = bounds


def _without_statistics(plan: StatisticsCollector) -> StatisticsCollector:
    return replace(plan, mode=MetricsMode(MetricModeTypes.NONE))


def data_file_writer(io: FileIO, metadata: TableMetadata) -> Callable[[WriteTask], DataFile]:
    """A function writing one task (rows already in the table's Arrow schema) as one data file.

    Iceberg keeps no bounds for values inside lists and maps (neither pyiceberg nor Iceberg Java's
    ParquetUtil: "we allow struct nesting, but not maps or arrays"), so their Parquet statistics
    are not computed; their value and null counts come from the file's level counts and the rows.
    A column of one value (a file's symbol, the exchange, the currency) has that value for its
    bounds: Parquet's statistics would hash every row of it to find out.
    """
    file_schema = metadata.schema()
    arrow_schema = file_schema.as_arrow()
    collections = [field for field in arrow_schema if _is_collection_of_primitives(field)]
    collection_paths = {path for field in collections for path in leaf_paths(field)}
    column_ids = parquet_path_to_id_mapping(file_schema)
    plans = compute_statistics_plan(file_schema, metadata.properties)
    for leaf in collection_paths:
        plans[column_ids[leaf]] = _without_statistics(plans[column_ids[leaf]])
    writer_options = _writer_options(metadata, arrow_schema, collection_paths)
    row_group_limit = property_as_int(
        metadata.properties, TableProperties.PARQUET_ROW_GROUP_LIMIT, TableProperties.PARQUET_ROW_GROUP_LIMIT_DEFAULT
    )
    locations = load_location_provider(table_location=metadata.location, table_properties=metadata.properties)

    def write(task: WriteTask) -> DataFile:
        rows = pa.Table.from_batches(task.record_batches)
        path = locations.new_data_location(
            data_file_name=task.generate_data_file_filename("parquet"), partition_key=task.partition_key
        )
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
        unread = {column_ids[name]: _without_statistics(plans[column_ids[name]]) for name in single}
        statistics = data_file_statistics_from_parquet_metadata(
            parquet_metadata=parquet_metadata, stats_columns={**plans, **unread}, parquet_column_mapping=column_ids
        )
        _fill_statistics(statistics, parquet_metadata, rows, collections, single, plans, column_ids)
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


def write_data_files(io: FileIO, metadata: TableMetadata, tasks: list[WriteTask]) -> list[DataFile]:
    """The tasks' data files (see :func:`data_file_writer`), written in parallel."""
    write = data_file_writer(io, metadata)
    if len(tasks) < 2:
        return [write(task) for task in tasks]
    with ThreadPoolExecutor(max_workers=min(len(tasks), os.cpu_count() or 1)) as pool:
        return list(pool.map(write, tasks))


def file_write_tasks(
    metadata: TableMetadata,
    rows: pa.Table,
    write_uuid: uuid.UUID,
    task_ids: Iterator[int],
    rows_per_file: int = ROWS_PER_DATA_FILE,
) -> list[WriteTask] | None:
    """One part's rows as write tasks per partition of at most ``rows_per_file`` rows; None when
    the rows are not grouped by partition."""
    if rows.num_rows == 0:
        return []
    pieces: list[tuple[PartitionKey | None, pa.Table]]
    if metadata.spec().is_unpartitioned():
        pieces = [(None, rows)]
    else:
        sliced = partition_slices(metadata, rows)
        if sliced is None:
            return None
        pieces = list(sliced)
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


@dataclass
class WrittenRows:
    """The rows of one commit and their Parquet data files, written once and re-used by every
    attempt of that commit: a conflict with another writer's commit then costs a metadata commit,
    not the Parquet write again. Written again only if the table's schema, spec or location
    changed meanwhile."""

    rows: pa.Table
    files: list[DataFile] | None = None
    written_for: tuple | None = None

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows

    def data_files(self, table: Table) -> list[DataFile]:
        metadata = table.metadata
        layout = (metadata.current_schema_id, metadata.default_spec_id, metadata.location)
        if self.files is None or self.written_for != layout:
            check_schema_compatible(metadata.schema(), self.rows.schema, metadata.format_version)
            self.files = (
                dataframe_to_data_files(metadata, self.rows, table.io, uuid.uuid4()) if self.rows.num_rows else []
            )
            self.written_for = layout
        return self.files
