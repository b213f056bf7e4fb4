"""Each use K2 makes of pyiceberg's private API (k2_resources/catalog/pyiceberg_adapter.py), held to
the pyiceberg version it was written for. A failure here after a pyiceberg upgrade names the use to
revisit; the version assertion fails first, on purpose, so the upgrade is a decision."""

from __future__ import annotations

import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyiceberg
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import EqualTo
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.types import LongType, NestedField, StringType

from k2_resources.catalog.pyiceberg_adapter import (
    WRITTEN_FOR,
    append_data_files,
    check_schema_compatible,
    dataframe_to_data_files,
    delete_as_overwrite,
    parquet_writer_options,
    transaction_of,
)

SCHEMA = Schema(
    NestedField(1, "symbol", StringType(), required=False),
    NestedField(2, "n", LongType(), required=False),
)


@pytest.fixture
def table(tmp_path: Path) -> Table:
    catalog = SqlCatalog(
        "adapter", uri=f"sqlite:///{tmp_path / 'catalog.db'}", warehouse=f"file://{tmp_path / 'warehouse'}"
    )
    catalog.create_namespace("test")
    return catalog.create_table("test.rows", schema=SCHEMA)


def _rows(symbols: list[str]) -> pa.Table:
    return pa.table({"symbol": symbols, "n": list(range(len(symbols)))}, schema=SCHEMA.as_arrow())


def _assert_version() -> None:
    assert pyiceberg.__version__.startswith(WRITTEN_FOR), (
        f"pyiceberg {pyiceberg.__version__}: the adapter was written for {WRITTEN_FOR}; check each use, then update"
    )


def test_check_schema_compatible_accepts_the_table_schema_and_refuses_another() -> None:
    """pyiceberg 0.12: ``pyiceberg.io.pyarrow._check_pyarrow_schema_compatible``."""
    _assert_version()
    check_schema_compatible(SCHEMA, SCHEMA.as_arrow(), 2)
    with pytest.raises(ValueError):
        check_schema_compatible(SCHEMA, pa.schema([pa.field("other", pa.float64())]), 2)


def test_dataframe_to_data_files_writes_files_without_committing(table: Table) -> None:
    """pyiceberg 0.12: ``pyiceberg.io.pyarrow._dataframe_to_data_files``."""
    _assert_version()
    files = dataframe_to_data_files(table.metadata, _rows(["A", "B", "C"]), table.io, uuid.uuid4())
    assert sum(f.record_count for f in files) == 3
    assert all(Path(f.file_path.removeprefix("file://")).exists() for f in files)
    assert table.current_snapshot() is None  # written, not committed


def test_append_data_files_commits_written_files_with_our_summary(table: Table) -> None:
    """pyiceberg 0.12: ``Transaction._append_snapshot_producer``."""
    _assert_version()
    files = dataframe_to_data_files(table.metadata, _rows(["A", "B"]), table.io, uuid.uuid4())
    with table.transaction() as transaction:
        append_data_files(transaction, {"k2.test": "yes"}, files)
    snapshot = table.current_snapshot()
    assert snapshot is not None and snapshot.summary is not None
    assert snapshot.summary.additional_properties["k2.test"] == "yes"
    assert table.scan().to_arrow().num_rows == 2
    with table.transaction() as transaction:  # an empty append still makes a snapshot
        append_data_files(transaction, {"k2.test": "empty"}, [])
    assert table.current_snapshot().snapshot_id != snapshot.snapshot_id


def test_delete_as_overwrite_deletes_the_matching_rows(table: Table) -> None:
    """pyiceberg 0.12: ``Transaction.delete(..., _isolation_operation=Operation.OVERWRITE)``."""
    _assert_version()
    table.append(_rows(["A", "B", "A"]))
    with table.transaction() as transaction:
        delete_as_overwrite(transaction, EqualTo("symbol", "A"), {"k2.test": "delete"})  # type: ignore[call-arg,misc]
    assert table.scan().to_arrow().column("symbol").to_pylist() == ["B"]


def test_transaction_of_works_out_the_staged_metadata_once_per_change_and_commits_as_pyiceberg(table: Table) -> None:
    """pyiceberg 0.12: ``Transaction.table_metadata`` over ``Transaction._table`` and ``Transaction._updates``."""
    _assert_version()
    table.append(_rows(["A"]))
    with transaction_of(table) as transaction:
        first = transaction.table_metadata
        assert transaction.table_metadata is first  # nothing staged since: the same result, not a new copy
        transaction.set_properties({"k2.test": "memo"})
        staged = transaction.table_metadata
        assert staged is not first and staged.properties["k2.test"] == "memo"
        plain = table.transaction()
        plain.set_properties({"k2.test": "memo"})
        # what pyiceberg itself works out (but the clock: each working-out stamps its own last-updated-ms)
        assert plain.table_metadata.model_dump(exclude={"last_updated_ms"}) == staged.model_dump(
            exclude={"last_updated_ms"}
        )
        files = dataframe_to_data_files(table.metadata, _rows(["B", "C"]), table.io, uuid.uuid4())
        append_data_files(transaction, {"k2.test": "memo-append"}, files)
    assert table.properties["k2.test"] == "memo"
    assert table.current_snapshot().summary.additional_properties["k2.test"] == "memo-append"  # type: ignore[union-attr]
    assert table.scan().to_arrow().num_rows == 3


def test_parquet_writer_options_follow_the_table_properties(tmp_path: Path) -> None:
    """pyiceberg 0.12: ``pyiceberg.io.pyarrow._get_parquet_writer_kwargs``."""
    _assert_version()
    options = parquet_writer_options({"write.parquet.compression-codec": "zstd"})
    assert options["compression"] == "zstd"
    pq.write_table(_rows(["A"]), tmp_path / "x.parquet", **options)  # options pyarrow accepts
