"""DuckDBQueryResource: SQL over the K2 Iceberg tables, in process.

Each K2 table appears as a view ``market.<name>`` over DuckDB's ``iceberg_scan`` of the
table's current metadata file, so filters on symbol, exchange and time are pushed into the
scan (partition pruning and Parquet statistics). The connection and its extensions come from
:mod:`k2_resources.query.connection`, shared with :mod:`k2_resources.query.sql_query` (which
`k2 query sql` uses without Dagster or pyiceberg, and which falls back to this resource).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import duckdb
import pyarrow as pa
from dagster import ConfigurableResource
from pydantic import Field

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import ALL_TABLES, NAMESPACE
from k2_resources.query.connection import connect_with_iceberg, use_object_store


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
        use_object_store(connection, dict(catalog.properties))
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
