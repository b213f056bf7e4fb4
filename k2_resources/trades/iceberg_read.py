"""Reading rows of one Iceberg snapshot of ``market.trades`` / ``market.quotes`` for a filter.

Four read paths are kept (``polars``: plan_files + polars; ``planned``: plan_files + DuckDB;
``pyiceberg``: scan().to_arrow(); ``duckdb``: iceberg_scan()); tests/benchmarks/bench_hybrid.py
compares them and docs/cost-model.md has the figures. The default is ``polars``, the fastest
on every query measured: pyiceberg plans the scan (partition pruning on the day and exchange
partitions, then file pruning on the column bounds of ``symbol`` and ``timestamp``, so a point
query plans a few files and a window that is all in Kafka none), and polars reads only the
planned Parquet files with the filter pushed into its reader (row groups skipped on their
statistics, predicate columns decoded first). Plans are cached per (snapshot, filter): a
snapshot never changes. A delete file among the planned manifest entries (pyiceberg itself
writes copy-on-write, so only other writers produce them) sends the read to pyiceberg's own
reader, which applies them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import chain
from typing import Literal, cast
from urllib.parse import unquote, urlparse

import duckdb
import polars as pl
import pyarrow as pa
from pyiceberg.catalog.noop import NoopCatalog
from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    EqualTo,
    GreaterThanOrEqual,
    In,
    LessThan,
)
from pyiceberg.io import load_file_io
from pyiceberg.manifest import DataFile, DataFileContent
from pyiceberg.serializers import FromInputFile
from pyiceberg.table import ManifestGroupPlanner, StaticTable, Table
from pyiceberg.table.snapshots import Snapshot

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.settings import catalog_properties
from k2_resources.catalog.tables import TableDefinition
from k2_resources.query.connection import connect_with_iceberg, use_object_store
from k2_resources.query.sql_query import NAMESPACE, sqlite_table_locations

ReadPath = Literal["polars", "planned", "duckdb", "pyiceberg"]
DEFAULT_READ_PATH: ReadPath = "polars"


@dataclass(frozen=True)
class RowFilter:
    """Which rows to read: symbols (None: all), the time window [start, end), an exchange."""

    symbols: tuple[str, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None
    exchange: str | None = None

    def iceberg(self) -> BooleanExpression:
        """The same filter as a pyiceberg expression, for partition and file pruning."""
        parts: list[BooleanExpression] = []
        if self.symbols is not None:
            parts.append(
                EqualTo(term="symbol", value=self.symbols[0])
                if len(self.symbols) == 1
                else In(term="symbol", literals=self.symbols)
            )
        if self.exchange is not None:
            parts.append(EqualTo(term="exchange", value=self.exchange))
        if self.start is not None:
            parts.append(GreaterThanOrEqual(term="timestamp", value=self.start.isoformat()))
        if self.end is not None:
            parts.append(LessThan(term="timestamp", value=self.end.isoformat()))
        expression: BooleanExpression = AlwaysTrue()
        for part in parts:
            expression = part if isinstance(expression, AlwaysTrue) else And(expression, part)
        return expression

    def polars(self) -> pl.Expr | None:
        """The same filter as one polars predicate (None: every row)."""
        conditions: list[pl.Expr] = []
        if self.symbols is not None:
            conditions.append(
                pl.col("symbol") == self.symbols[0]
                if len(self.symbols) == 1
                else pl.col("symbol").is_in(list(self.symbols))
            )
        if self.exchange is not None:
            conditions.append(pl.col("exchange") == self.exchange)
        if self.start is not None:
            conditions.append(pl.col("timestamp") >= self.start)
        if self.end is not None:
            conditions.append(pl.col("timestamp") < self.end)
        return pl.all_horizontal(conditions) if conditions else None

    def sql(self) -> tuple[str, list[object]]:
        """A WHERE clause with ``?`` placeholders, and its parameters."""
        clauses: list[str] = []
        parameters: list[object] = []
        if self.symbols is not None:
            clauses.append(f"symbol IN ({', '.join('?' for _ in self.symbols)})")
            parameters.extend(self.symbols)
        if self.exchange is not None:
            clauses.append("exchange = ?")
            parameters.append(self.exchange)
        if self.start is not None:
            clauses.append('"timestamp" >= ?')
            parameters.append(self.start)
        if self.end is not None:
            clauses.append('"timestamp" < ?')
            parameters.append(self.end)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", parameters


@dataclass
class ScanStats:
    """What a read touched: planned files out of the snapshot's files, and rows returned."""

    files_planned: int = 0
    files_total: int = 0
    rows: int = 0
    path: str = ""


def load_for_read(iceberg: IcebergResource, definition: TableDefinition) -> Table:
    """``definition``'s table as of now, for reading: one catalog row and one metadata file.

    With the default catalog (SQLite on local files) the row is read with sqlite3 and the table
    is opened read-only from its metadata file, which is what pyiceberg's SqlCatalog does too, minus
    importing SQLAlchemy's ORM and opening every K2 table (a large share of a new process's first
    query). Any other catalog, or a catalog without the table yet (it is then created), goes
    through ``iceberg.table``."""
    properties = catalog_properties(iceberg.catalog_properties)
    location = (sqlite_table_locations(properties, iceberg.catalog_name, NAMESPACE) or {}).get(definition.identifier)
    if location is None:
        return iceberg.table(definition)
    metadata = FromInputFile.table_metadata(load_file_io(properties, location).new_input(location))
    return StaticTable(
        identifier=tuple(definition.identifier.split(".")),
        metadata=metadata,
        metadata_location=location,
        io=load_file_io({**properties, **metadata.properties}, location),
        catalog=NoopCatalog(iceberg.catalog_name),
    )


def _data_files_matching(
    table: Table, snapshot: Snapshot | None, expression: BooleanExpression
) -> list[DataFile] | None:
    """The live data files of ``snapshot`` that may hold rows matching ``expression`` (partition and column
    bound pruning, as pyiceberg's plan_files); None when a matching manifest holds delete files.

    pyiceberg's ``plan_files`` also works out a residual filter per file, which the readers here do not
    use (polars and DuckDB apply the whole filter): with a data file per sink commit that was most of
    the planning time of a new process's first query."""
    if snapshot is None:
        return []
    planner = ManifestGroupPlanner(table.metadata, table.io, expression)
    files: list[DataFile] = []
    for entry in chain.from_iterable(planner.plan_manifest_entries(snapshot.manifests(table.io))):
        if entry.data_file.content != DataFileContent.DATA:
            return None  # merge-on-read deletes: pyiceberg's reader applies them
        files.append(entry.data_file)
    return files


def _local_path(location: str) -> str:
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return unquote(parsed.path) if parsed.scheme else location
    return location  # s3://, gs://: DuckDB's httpfs reads them when configured


def object_store_options(table: Table, files: Sequence[str]) -> dict[str, str] | None:
    """polars' storage options for S3 files: the endpoint and credentials of the table's FileIO
    (pyiceberg's ``s3.*`` catalog properties); None for local files."""
    if not any(str(path).startswith(("s3://", "s3a://")) for path in files):
        return None
    properties = table.io.properties
    options = {
        "aws_access_key_id": properties.get("s3.access-key-id"),
        "aws_secret_access_key": properties.get("s3.secret-access-key"),
        "aws_session_token": properties.get("s3.session-token"),
        "aws_region": properties.get("s3.region") or properties.get("client.region") or "us-east-1",
        "aws_endpoint_url": properties.get("s3.endpoint"),
    }
    if str(options["aws_endpoint_url"] or "").startswith("http://"):
        options["aws_allow_http"] = "true"
    return {key: value for key, value in options.items() if value}


@dataclass
class SnapshotReader:
    """Reads rows of one pinned snapshot of one table; reuses one DuckDB connection."""

    read_path: ReadPath = DEFAULT_READ_PATH
    threads: int = 2
    plan_cache_size: int = 256
    _plans: OrderedDict = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _plain: duckdb.DuckDBPyConnection | None = field(default=None, repr=False)
    _iceberg: duckdb.DuckDBPyConnection | None = field(default=None, repr=False)
    _object_stores: set = field(default_factory=set, repr=False)

    def _connection(self, with_iceberg: bool) -> duckdb.DuckDBPyConnection:
        if with_iceberg:
            if self._iceberg is None:
                self._iceberg = connect_with_iceberg()
                self._iceberg.execute("SET threads = ?", [self.threads])
            return self._iceberg
        if self._plain is None:
            self._plain = duckdb.connect()
            self._plain.execute("SET TimeZone = 'UTC'")
            self._plain.execute("SET threads = ?", [self.threads])
        return self._plain

    def read(
        self,
        table: Table,
        snapshot_id: int | None,
        row_filter: RowFilter,
        columns: Sequence[str] | None = None,
        stats: ScanStats | None = None,
        exact_schema: bool = True,
    ) -> pa.Table:
        """Rows of ``snapshot_id`` (None: the table has no snapshot -> no rows) matching the filter.

        ``exact_schema=False`` skips the final cast to the table's Arrow types (large strings),
        for callers that convert to polars anyway.
        """
        schema = table.schema().as_arrow()
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        stats = stats if stats is not None else ScanStats()
        stats.path = self.read_path
        if snapshot_id is None:
            return schema.empty_table()
        if self.read_path == "polars":
            result = self.read_frame(table, snapshot_id, row_filter, columns, stats).to_arrow()
        elif self.read_path == "pyiceberg":
            result = self._read_pyiceberg(table, snapshot_id, row_filter, columns, stats)
        elif self.read_path == "duckdb":
            result = self._read_duckdb_iceberg(table, snapshot_id, row_filter, columns)
        else:
            result = self._read_planned(table, snapshot_id, row_filter, columns, stats)
        stats.rows = result.num_rows
        if not exact_schema:
            return result
        return result.cast(schema) if result.schema != schema else result

    def read_frame(
        self,
        table: Table,
        snapshot_id: int | None,
        row_filter: RowFilter,
        columns: Sequence[str] | None = None,
        stats: ScanStats | None = None,
    ) -> pl.DataFrame:
        """Like :meth:`read`, as a polars DataFrame (the polars path never goes through Arrow)."""
        if self.read_path != "polars":
            return cast(
                pl.DataFrame,
                pl.from_arrow(self.read(table, snapshot_id, row_filter, columns, stats, exact_schema=False)),
            )
        stats = stats if stats is not None else ScanStats()
        stats.path = self.read_path
        empty = table.schema().as_arrow()
        if columns is not None:
            empty = pa.schema([empty.field(c) for c in columns])
        files = self.planned_files(table, snapshot_id, row_filter, stats) if snapshot_id is not None else []
        frame: pl.DataFrame
        if files is None and snapshot_id is not None:  # merge-on-read deletes: let pyiceberg apply them
            frame = cast(
                pl.DataFrame, pl.from_arrow(self._read_pyiceberg(table, snapshot_id, row_filter, columns, stats))
            )
        elif not files:
            frame = cast(pl.DataFrame, pl.from_arrow(empty.empty_table()))
        else:
            scan = pl.scan_parquet(files, hive_partitioning=False, storage_options=object_store_options(table, files))
            predicate = row_filter.polars()
            if predicate is not None:
                scan = scan.filter(predicate)
            if columns is not None:
                scan = scan.select(list(columns))
            frame = scan.collect()
        stats.rows = frame.height
        return frame

    def _read_pyiceberg(
        self, table: Table, snapshot_id: int, row_filter: RowFilter, columns: Sequence[str] | None, stats: ScanStats
    ) -> pa.Table:
        scan = table.scan(
            row_filter=row_filter.iceberg(),
            snapshot_id=snapshot_id,
            selected_fields=tuple(columns) if columns else ("*",),
        )
        return scan.to_arrow()

    def _select(self, columns: Sequence[str] | None) -> str:
        # Column names come from the table schema, never from user input.
        return ", ".join(f'"{c}"' for c in columns) if columns else "*"

    def _read_duckdb_iceberg(
        self, table: Table, snapshot_id: int, row_filter: RowFilter, columns: Sequence[str] | None
    ) -> pa.Table:
        where, parameters = row_filter.sql()
        with self._lock:
            connection = self._connection(with_iceberg=True)
            self._reach_object_store(connection, table)
            connection.execute("SET VARIABLE k2_metadata = ?", [table.metadata_location])
            connection.execute("SET VARIABLE k2_snapshot = ?", [snapshot_id])
            sql = (
                f"SELECT {self._select(columns)} FROM iceberg_scan(getvariable('k2_metadata'), "
                f"snapshot_from_id => getvariable('k2_snapshot')::UBIGINT){where}"
            )
            return connection.execute(sql, parameters).fetch_arrow_table()

    def planned_files(
        self, table: Table, snapshot_id: int, row_filter: RowFilter, stats: ScanStats | None = None
    ) -> list[str] | None:
        """Data files pyiceberg's planning keeps for the filter; None if any has delete files.

        A snapshot never changes, so its plan for a filter is kept (LRU): a repeated query skips
        reading the manifests again.
        """
        key = (table.metadata.table_uuid, snapshot_id, row_filter)
        with self._lock:
            cached = self._plans.get(key)
            if cached is not None:
                self._plans.move_to_end(key)
        if cached is None:
            snapshot = table.snapshot_by_id(snapshot_id)
            data_files = _data_files_matching(table, snapshot, row_filter.iceberg())
            files = None if data_files is None else tuple(_local_path(data.file_path) for data in data_files)
            total = (
                int(snapshot.summary.additional_properties.get("total-data-files", 0))
                if snapshot and snapshot.summary
                else 0
            )
            cached = (files, 0 if data_files is None else len(data_files), total)
            with self._lock:
                self._plans[key] = cached
                while len(self._plans) > self.plan_cache_size:
                    self._plans.popitem(last=False)
        files, planned, total = cached
        if stats is not None:
            stats.files_planned, stats.files_total = planned, total
        return None if files is None else list(files)

    def _read_planned(
        self, table: Table, snapshot_id: int, row_filter: RowFilter, columns: Sequence[str] | None, stats: ScanStats
    ) -> pa.Table:
        files = self.planned_files(table, snapshot_id, row_filter, stats)
        if files is None:  # merge-on-read deletes: let pyiceberg apply them
            return self._read_pyiceberg(table, snapshot_id, row_filter, columns, stats)
        if not files:
            schema = table.schema().as_arrow()
            return (pa.schema([schema.field(c) for c in columns]) if columns else schema).empty_table()
        where, parameters = row_filter.sql()
        with self._lock:
            connection = self._connection(with_iceberg=False)
            self._reach_object_store(connection, table)
            connection.execute("SET VARIABLE k2_files = ?", [files])
            source = "read_parquet(getvariable('k2_files'), hive_partitioning = false)"
            sql = f"SELECT {self._select(columns)} FROM {source}{where}"
            return connection.execute(sql, parameters).fetch_arrow_table()

    def _reach_object_store(self, connection: duckdb.DuckDBPyConnection, table: Table) -> None:
        """Give ``connection`` the S3 store of the table's FileIO, once per connection and store."""
        properties = dict(table.io.properties)
        store = (id(connection), properties.get("s3.endpoint"), properties.get("s3.access-key-id"))
        if store[1] and store not in self._object_stores:
            use_object_store(connection, properties)
            self._object_stores.add(store)

    def close(self) -> None:
        for connection in (self._plain, self._iceberg):
            if connection is not None:
                connection.close()
        self._plain = self._iceberg = None
