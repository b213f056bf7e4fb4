"""SQL over the K2 Iceberg tables with DuckDB, importing neither Dagster nor pyiceberg on the way.

`k2 query sql` starts a new process each time, so what it imports is most of what it costs
(Dagster and pyiceberg's SQL catalog each take a large share). Each table appears as a view
``market.<name>``. Loading DuckDB's iceberg extension is slow too, so a table whose current
snapshot has data files only (no delete files) and one schema becomes a view over
``read_parquet`` of exactly the files its manifests list as live, read with fastavro; any other
table is a view over the extension's ``iceberg_scan`` of its current metadata file.

Where the metadata files are: with the default catalog (pyiceberg's SqlCatalog on SQLite,
warehouse on local files) each table's current metadata location is one row of the catalog's
``iceberg_tables`` table, read here with sqlite3; a table without a snapshot is an empty view
of its schema, taken from its metadata file. Any other catalog (REST, Glue, S3 warehouses) goes
through :class:`k2_resources.query.duckdb_query.DuckDBQueryResource`, which asks pyiceberg
(imported only then, so the light path never loads Dagster). The DuckDB connection and its
extensions come from :mod:`k2_resources.query.connection`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast
from urllib.parse import unquote, urlparse

import duckdb
import fastavro

from k2_resources.catalog.settings import catalog_properties as resolve_catalog_properties
from k2_resources.query.connection import connect_duckdb, load_iceberg_extension

NAMESPACE = "market"
CATALOG_NAME = "k2"
_DELETED_ENTRY = 2  # a manifest entry's status: 0 existing, 1 added, 2 deleted


def _local_path(location: str) -> Path | None:
    """A local file path from a ``file://`` URI or a plain path; None for object stores."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def sqlite_table_locations(
    properties: dict[str, str], catalog_name: str = CATALOG_NAME, namespace: str = NAMESPACE
) -> dict[str, str] | None:
    """``{"market.trades": <metadata location>, ...}`` read from a SQLite SqlCatalog with sqlite3;
    None when the catalog is not a SQLite SqlCatalog on local files, or holds no K2 table yet
    (the caller then goes through pyiceberg, which also creates the tables)."""
    uri = properties.get("uri", "")
    if properties.get("type", "sql") != "sql" or not uri.startswith("sqlite:///"):
        return None
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_file():
        return None
    try:
        with sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True) as connection:
            rows = connection.execute(
                "SELECT table_name, metadata_location FROM iceberg_tables "
                "WHERE catalog_name = ? AND table_namespace = ?",
                [catalog_name, namespace],
            ).fetchall()
    except sqlite3.Error:
        return None
    locations = {f"{namespace}.{name}": location for name, location in rows if location}
    if not locations or any(_local_path(location) is None for location in locations.values()):
        return None
    return locations


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def duckdb_type(iceberg_type: Any) -> str:
    """The DuckDB type of an Iceberg type as written in table metadata JSON."""
    if isinstance(iceberg_type, dict):
        kind = iceberg_type["type"]
        if kind == "list":
            return f"{duckdb_type(iceberg_type['element'])}[]"
        if kind == "map":
            return f"MAP({duckdb_type(iceberg_type['key'])}, {duckdb_type(iceberg_type['value'])})"
        if kind == "struct":
            return (
                "STRUCT("
                + ", ".join(f"{_quote(f['name'])} {duckdb_type(f['type'])}" for f in iceberg_type["fields"])
                + ")"
            )
        raise ValueError(f"unknown Iceberg type {iceberg_type!r}")
    name = str(iceberg_type)
    if name.startswith("decimal("):
        return name.upper()
    if name.startswith("fixed["):
        return "BLOB"
    simple = {
        "boolean": "BOOLEAN",
        "int": "INTEGER",
        "long": "BIGINT",
        "float": "FLOAT",
        "double": "DOUBLE",
        "date": "DATE",
        "time": "TIME",
        "timestamp": "TIMESTAMP",
        "timestamptz": "TIMESTAMPTZ",
        "timestamp_ns": "TIMESTAMP_NS",
        "timestamptz_ns": "TIMESTAMPTZ",
        "string": "VARCHAR",
        "uuid": "UUID",
        "binary": "BLOB",
    }
    if name not in simple:
        raise ValueError(f"unknown Iceberg type {name!r}")
    return simple[name]


def create_views(connection: duckdb.DuckDBPyConnection, locations: dict[str, str]) -> None:
    """One view per table: over ``read_parquet`` of its live data files when :func:`live_data_files`
    finds them, else over ``iceberg_scan`` of its metadata file (bound, never pasted); a table
    without a snapshot or without rows becomes an empty view of its current schema."""
    schemas = {identifier.split(".", 1)[0] for identifier in locations}
    for schema in sorted(schemas):
        connection.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(schema)}")
    for identifier, location in sorted(locations.items()):
        schema, name = identifier.split(".", 1)
        view = f"{_quote(schema)}.{_quote(name)}"
        variable = "k2_" + re.sub(r"[^A-Za-z0-9_]", "_", f"{schema}_{name}")
        path = _local_path(location)
        metadata = json.loads(path.read_text()) if path is not None else None
        snapshot = None if metadata is None else metadata.get("current-snapshot-id")
        files = None if metadata is None or snapshot in (None, -1) else live_data_files(metadata)
        if metadata is not None and (snapshot in (None, -1) or files is not None):
            current = next(s for s in metadata["schemas"] if s["schema-id"] == metadata.get("current-schema-id", 0))
            if not files:
                columns = ", ".join(
                    f"CAST(NULL AS {duckdb_type(f['type'])}) AS {_quote(f['name'])}" for f in current["fields"]
                )
                connection.execute(f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} WHERE false")
                continue
            columns = ", ".join(
                f"CAST({_quote(f['name'])} AS {duckdb_type(f['type'])}) AS {_quote(f['name'])}"
                for f in current["fields"]
            )
            # The file list goes in as a bound variable, never pasted into the SQL.
            connection.execute(f"SET VARIABLE {variable}_files = ?", [files])
            connection.execute(
                f"CREATE OR REPLACE VIEW {view} AS SELECT {columns} FROM read_parquet("
                f"getvariable('{variable}_files'), hive_partitioning = false)"
            )
            continue
        load_iceberg_extension(connection)
        # The metadata location goes in as a bound parameter, never pasted into the SQL.
        connection.execute(f"SET VARIABLE {variable}_metadata = ?", [location])
        connection.execute(
            f"CREATE OR REPLACE VIEW {view} AS SELECT * FROM iceberg_scan(getvariable('{variable}_metadata'))"
        )


def live_data_files(metadata: dict[str, Any]) -> list[str] | None:
    """Local paths of the data files of the current snapshot, from its manifest list and manifests;
    None when a plain Parquet read would not be the table: the schema has evolved, a manifest holds
    delete files, or a file is not on the local file system."""
    if len(metadata.get("schemas", [])) != 1:
        return None
    snapshot_id = metadata.get("current-snapshot-id")
    snapshot = next((s for s in metadata.get("snapshots", []) if s["snapshot-id"] == snapshot_id), None)
    manifest_list = None if snapshot is None else _local_path(snapshot.get("manifest-list", ""))
    if manifest_list is None:
        return None
    files: list[str] = []
    # Manifest lists and manifests are Avro records of the Iceberg spec: dicts of known fields.
    with manifest_list.open("rb") as stream:
        manifests = cast(list[dict[str, Any]], list(fastavro.reader(stream)))
    for manifest in manifests:
        path = _local_path(manifest["manifest_path"])
        if manifest.get("content", 0) != 0 or path is None:
            return None
        with path.open("rb") as stream:
            for entry in cast(Iterator[dict[str, Any]], fastavro.reader(stream)):
                if entry["status"] == _DELETED_ENTRY:
                    continue
                data_file: dict[str, Any] = entry["data_file"]
                local = _local_path(data_file["file_path"])
                if (
                    data_file.get("content", 0) != 0
                    or local is None
                    or data_file.get("file_format", "PARQUET").upper() != "PARQUET"
                ):
                    return None
                files.append(str(local))
    return files


def connect_tables(threads: int = 2, catalog_properties: dict[str, str] | None = None) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection whose ``market.*`` views read each table's current snapshot.

    The SQLite catalog is read directly; any other catalog through DuckDBQueryResource (pyiceberg).
    """
    locations = sqlite_table_locations(resolve_catalog_properties(catalog_properties))
    if locations is None:
        # Not the SQLite catalog on local files, or no tables yet: pyiceberg reads (and creates) them.
        # Imported here, one way (duckdb_query never imports this module): the light path above
        # must not load Dagster or pyiceberg.
        from k2_resources.catalog.resource import IcebergResource
        from k2_resources.query.duckdb_query import DuckDBQueryResource

        return DuckDBQueryResource(
            iceberg=IcebergResource(catalog_properties=catalog_properties), threads=threads
        ).connect()
    connection = connect_duckdb()
    connection.execute("SET threads = ?", [threads])
    create_views(connection, locations)
    return connection


def run_sql(
    sql: str,
    parameters: Sequence[Any] | None = None,
    threads: int = 2,
    catalog_properties: dict[str, str] | None = None,
) -> tuple[list[str], list[tuple]]:
    """Run SQL (``?`` parameters for values) over the K2 tables: (column names, rows as tuples)."""
    connection = connect_tables(threads, catalog_properties)
    try:
        cursor = connection.execute(sql, list(parameters or []))
        columns = [d[0] for d in cursor.description or []]
        return columns, cursor.fetchall()
    finally:
        connection.close()
