"""DuckDBQueryResource: SQL over the K2 Iceberg tables, in process.

Each K2 table appears as a view ``market.<name>`` over DuckDB's ``iceberg_scan`` of the
table's current metadata file, so filters on symbol, exchange and time are pushed into the
scan (partition pruning and Parquet statistics). The DuckDB extensions come from their PyPI
packages, because DuckDB cannot download extensions on machines without internet access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Sequence

import duckdb
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field

from k2_resources.iceberg import IcebergResource
from k2_resources.settings import state_dir
from k2_resources.tables import ALL_TABLES, NAMESPACE

_EXTENSION_PACKAGES = ("duckdb_extension_avro", "duckdb_extension_iceberg")


def _packaged_extension(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the Python package {package} is missing; run `make install` (or `uv sync`) to install it")
    root = Path(next(iter(spec.submodule_search_locations)))
    version = f"v{duckdb.__version__}"
    candidates = sorted(root.glob(f"extensions/{version}/*.duckdb_extension")) or sorted(
        root.glob("extensions/*/*.duckdb_extension")
    )
    if not candidates:
        raise RuntimeError(f"{package} carries no DuckDB extension for duckdb {duckdb.__version__}; "
                           "install the duckdb-extension-* version that matches duckdb")
    return candidates[0]


def connect_with_iceberg(database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the avro and iceberg extensions loaded from their PyPI packages."""
    connection = duckdb.connect(database)
    connection.execute("SET extension_directory = ?", [str(state_dir("duckdb", "extensions"))])
    connection.execute("SET TimeZone = 'UTC'")
    for package in _EXTENSION_PACKAGES:
        name = package.removeprefix("duckdb_extension_")
        try:
            connection.execute(f"LOAD {name}")  # name is one of two constants above
        except duckdb.Error:
            # INSTALL takes no bound parameters; the path is the installed package's own file.
            path = str(_packaged_extension(package)).replace("'", "''")
            connection.execute(f"FORCE INSTALL '{path}'")
            connection.execute(f"LOAD {name}")
    return connection


class DuckDBQueryResource(ConfigurableResource):
    """Read-only SQL over every K2 table: ``market.trades``, ``quotes``, ``dead_letters`` and ``ohlcv``."""

    iceberg: IcebergResource = Field(default_factory=IcebergResource)
    threads: int = Field(default=2, description="DuckDB worker threads")

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A connection whose ``market.*`` views read each table's current snapshot."""
        connection = connect_with_iceberg()
        connection.execute("SET threads = ?", [self.threads])
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {NAMESPACE}")
        catalog = self.iceberg.catalog()
        for definition in ALL_TABLES:
            table = catalog.load_table(definition.identifier)
            variable = f"k2_{definition.name}_metadata"
            # The metadata location goes in as a bound parameter, never pasted into the SQL.
            connection.execute(f"SET VARIABLE {variable} = ?", [table.metadata_location])
            if table.current_snapshot() is None:
                # iceberg_scan cannot read a table without a snapshot: an empty view of its schema.
                empty = pa.Table.from_batches([], schema=definition.arrow_schema())
                connection.register(f"_{variable}_empty", empty)
                connection.execute(f"CREATE OR REPLACE VIEW {definition.identifier} AS SELECT * FROM _{variable}_empty")
            else:
                connection.execute(
                    f"CREATE OR REPLACE VIEW {definition.identifier} AS "
                    f"SELECT * FROM iceberg_scan(getvariable('{variable}'))"
                )
        return connection

    def query(self, sql: str, parameters: Sequence[Any] | None = None) -> pa.Table:
        """Run SQL (with ``?`` parameters for values) and return Arrow."""
        connection = self.connect()
        try:
            return connection.execute(sql, parameters or []).fetch_arrow_table()
        finally:
            connection.close()
