"""Every use K2 makes of pyiceberg's private API, in one place, written for pyiceberg 0.12.

pyiceberg has no public way to do these, and K2 needs each one:

- write Parquet data files for a table without committing them (``_dataframe_to_data_files``), so
  one commit's files are written once and re-used by every retry of that commit, and compaction
  writes files of its own size;
- check that Arrow rows fit a table's schema before writing them (``_check_pyarrow_schema_compatible``);
- append already written data files with a snapshot summary of K2's own
  (``Transaction._append_snapshot_producer``, what ``Transaction.append`` does inside);
- delete rows so that the delete validates against concurrent writers as an overwrite does
  (``Transaction.delete(..., _isolation_operation=...)``, what ``Transaction.overwrite`` does);
- the Parquet writer options a table's properties ask for (``_get_parquet_writer_kwargs``);
- a transaction that works out its staged metadata once per staged change and without copying the
  whole metadata (:class:`MemoTransaction`, over ``Transaction._updates`` and ``Transaction._table``,
  with ``pyiceberg.table.update._apply_table_update`` and ``_TableMetadataUpdateContext``).

Nothing else in K2 may touch a pyiceberg name that starts with an underscore.
``tests/unit/test_pyiceberg_adapter.py`` holds each function to the pyiceberg version it was
written for; when pyiceberg is upgraded, those tests say which of these to revisit.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pyarrow as pa
from pyiceberg.expressions import BooleanExpression
from pyiceberg.io import FileIO
from pyiceberg.io.pyarrow import (
    _check_pyarrow_schema_compatible,
    _dataframe_to_data_files,
    _get_parquet_writer_kwargs,
)
from pyiceberg.manifest import DataFile
from pyiceberg.schema import Schema
from pyiceberg.table import Table, Transaction
from pyiceberg.table.metadata import TableMetadata
from pyiceberg.table.snapshots import Operation
from pyiceberg.table.update import TableUpdate, _apply_table_update, _TableMetadataUpdateContext
from pyiceberg.utils.datetime import datetime_to_millis

WRITTEN_FOR = "0.12"  # the pyiceberg minor version these functions were written and tested against


def check_schema_compatible(table_schema: Schema, arrow_schema: pa.Schema, format_version: int) -> None:
    """Raise ValueError when rows of ``arrow_schema`` cannot be written to a table of ``table_schema``."""
    _check_pyarrow_schema_compatible(table_schema, provided_schema=arrow_schema, format_version=format_version)  # type: ignore[arg-type]


def dataframe_to_data_files(
    metadata: TableMetadata,
    rows: pa.Table,
    io: FileIO,
    write_uuid: uuid.UUID,
    counter: itertools.count[int] | None = None,
) -> list[DataFile]:
    """``rows`` written as Parquet data files of the table ``metadata`` describes, not committed."""
    return list(
        _dataframe_to_data_files(table_metadata=metadata, df=rows, io=io, write_uuid=write_uuid, counter=counter)
    )


def append_data_files(transaction: Transaction, summary: dict[str, str], data_files: Iterable[DataFile]) -> None:
    """Append ``data_files`` (possibly none) in ``transaction`` as one fast-append snapshot whose
    summary carries ``summary``: ``Transaction.append`` with files already written."""
    with transaction._append_snapshot_producer(summary) as append_files:
        for data_file in data_files:
            append_files.append_data_file(data_file)


def delete_as_overwrite(transaction: Transaction, row_filter: BooleanExpression, summary: dict[str, str]) -> None:
    """Delete the rows matching ``row_filter`` in ``transaction``, validated against concurrent
    writers as an overwrite (what ``Transaction.overwrite`` does before it appends)."""
    transaction.delete(delete_filter=row_filter, snapshot_properties=summary, _isolation_operation=Operation.OVERWRITE)


def staged_metadata(base: TableMetadata, updates: tuple[TableUpdate, ...]) -> TableMetadata:
    """``base`` with ``updates`` applied: pyiceberg's ``update_table_metadata`` for a transaction's own
    reads, without its closing deep copy (each update already returns a new, frozen TableMetadata)."""
    context = _TableMetadataUpdateContext()
    metadata = base
    for update in updates:
        metadata = _apply_table_update(update, metadata, context)
    if context.has_changes() and base.last_updated_ms == metadata.last_updated_ms:
        metadata = metadata.model_copy(update={"last_updated_ms": datetime_to_millis(datetime.now().astimezone())})
    metadata.spec().check_compatible(metadata.schema())
    metadata.sort_order().check_compatible(metadata.schema())
    return metadata


class MemoTransaction(Transaction):
    """A ``Transaction`` whose staged metadata is worked out once per staged change, without copies.

    pyiceberg 0.12's ``Transaction.table_metadata`` applies the staged updates to a deep copy of the
    table's metadata each time it is read, and one append reads it about twenty times. A table
    committed to every second keeps hundreds of snapshots in its metadata, so that copying was most
    of a commit's CPU, and it grew with the snapshots kept. TableMetadata is immutable (frozen
    models, changed only by copies), so one result per (base metadata, staged updates) serves every
    read, and nothing staged means the table's own metadata. The catalog's commit is pyiceberg's own.
    """

    _memo: tuple[object, object, TableMetadata] | None = None

    @property
    def table_metadata(self) -> TableMetadata:
        if not self._updates:
            return self._table.metadata
        memo = self._memo
        if memo is not None and memo[0] is self._table.metadata and memo[1] is self._updates:
            return memo[2]
        metadata = staged_metadata(self._table.metadata, self._updates)
        self._memo = (self._table.metadata, self._updates, metadata)
        return metadata


def transaction_of(table: Table) -> Transaction:
    """``table.transaction()``, as a :class:`MemoTransaction`: every K2 commit opens its transaction here."""
    return MemoTransaction(table)


def parquet_writer_options(table_properties: dict[str, str]) -> dict[str, Any]:
    """The ``pyarrow.parquet.ParquetWriter`` options the table's ``write.parquet.*`` properties ask for."""
    return dict(_get_parquet_writer_kwargs(table_properties))
