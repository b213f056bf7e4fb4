"""Replacing rows of an Iceberg table: delete what a filter matches and append new rows, one commit.

What an ASX day write needs (a day's rows replace the old ones): :func:`replace_rows` writes the
rows and commits; :func:`replace_with_files` commits data files written beforehand. Both commit
through the commit layer (:mod:`k2_resources.catalog.commit`), so a race with another writer (a
neighbouring day in the same backfill) is retried on a freshly loaded table.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable

import pyarrow as pa
from pyiceberg.expressions import BooleanExpression
from pyiceberg.io.pyarrow import bin_pack_arrow_table, pyarrow_to_schema, write_file
from pyiceberg.manifest import DataFile
from pyiceberg.table import Table, TableProperties, WriteTask
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.utils.properties import property_as_int

from k2_resources.catalog.commit import with_commit_retries
from k2_resources.catalog.data_files import write_data_files
from k2_resources.catalog.errors import TableChangedError
from k2_resources.catalog.partitioning import decoded_schema, in_table_schema, partition_slices
from k2_resources.catalog.pyiceberg_adapter import delete_as_overwrite, transaction_of

REPLACE_ATTEMPTS = 8


def _overwrite(table: Table, rows: pa.Table, row_filter: BooleanExpression, properties: dict[str, str]) -> None:
    """``table.overwrite`` (delete ``row_filter``, append ``rows``, one transaction), splitting
    the rows into partitions by :func:`partition_slices` instead of pyiceberg's filter per
    partition; falls back to ``table.overwrite`` when that does not apply."""
    with transaction_of(table) as transaction:
        metadata = transaction.table_metadata
        pieces = partition_slices(metadata, rows)
        if pieces is None:
            transaction.overwrite(rows, overwrite_filter=row_filter, snapshot_properties=properties)
            return
        delete_as_overwrite(transaction, row_filter, properties)
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
                write_data_files(table.io, metadata, tasks) if direct else write_file(table.io, metadata, iter(tasks))
            )
            for data_file in written:
                append.append_data_file(data_file)


def _committing(load_table: Callable[[], Table], commit: Callable[[Table], None], what: str, attempts: int) -> Table:
    """``commit`` against a freshly loaded table, through the commit layer; the table it committed to."""

    def attempt(_: int) -> Table:
        table = load_table()
        with warnings.catch_warnings():
            # The first load of a day deletes nothing; pyiceberg warns about that, harmlessly.
            warnings.filterwarnings("ignore", message="Delete operation did not match any records")
            commit(table)
        return table

    return with_commit_retries(attempt, what, max_attempts=attempts, gave_up="run the write again")


def replace_rows(
    load_table: Callable[[], Table],
    rows: pa.Table,
    row_filter: BooleanExpression,
    properties: dict[str, str],
    attempts: int = REPLACE_ATTEMPTS,
) -> Table:
    """Delete the rows matching ``row_filter`` and append ``rows`` in one Iceberg transaction."""
    return _committing(
        load_table,
        lambda table: _overwrite(table, in_table_schema(rows, table.schema().as_arrow()), row_filter, properties),
        f"replacing rows where {row_filter}",
        attempts,
    )


def replace_with_files(
    load_table: Callable[[], Table],
    written_for: TableMetadata,
    data_files: list[DataFile],
    row_filter: BooleanExpression,
    properties: dict[str, str],
    attempts: int = REPLACE_ATTEMPTS,
) -> Table:
    """Delete the rows matching ``row_filter`` and add ``data_files`` (written for the table as
    ``written_for`` describes it) in one Iceberg transaction. Raises TableChangedError when the
    table's schema or spec is no longer the one the files were written with."""

    def commit(table: Table) -> None:
        metadata = table.metadata
        if (metadata.current_schema_id, metadata.default_spec_id) != (
            written_for.current_schema_id,
            written_for.default_spec_id,
        ):
            raise TableChangedError(
                f"{table.name()}: its schema or partition spec changed after its files were written"
            )
        with transaction_of(table) as transaction:
            delete_as_overwrite(transaction, row_filter, properties)
            with transaction.update_snapshot(snapshot_properties=properties).fast_append() as append:
                for data_file in data_files:
                    append.append_data_file(data_file)

    return _committing(load_table, commit, f"replacing rows where {row_filter} with {len(data_files)} files", attempts)
