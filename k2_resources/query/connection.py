"""DuckDB connections for K2's readers: extensions from their PyPI packages, the object store.

Shared by :mod:`k2_resources.query.sql_query` (no Dagster, no pyiceberg),
:mod:`k2_resources.query.duckdb_query` (the Dagster resource) and the Iceberg readers. The DuckDB
extensions come from their PyPI packages, because DuckDB cannot download extensions on machines
without internet access.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import urlparse

import duckdb

from k2_resources.paths import state_dir

_EXTENSION_PACKAGES = ("duckdb_extension_avro", "duckdb_extension_iceberg")
_EXTENSION_NAMES = ("avro", "iceberg", "httpfs")


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
        raise RuntimeError(
            f"{package} carries no DuckDB extension for duckdb {duckdb.__version__}; "
            "install the duckdb-extension-* version that matches duckdb"
        )
    return candidates[0]


def connect_with_iceberg(database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the avro and iceberg extensions loaded from their PyPI packages."""
    connection = connect_duckdb(database)
    load_iceberg_extension(connection)
    return connection


def connect_duckdb(database: str = ":memory:") -> duckdb.DuckDBPyConnection:
    """A DuckDB connection in UTC whose extensions install under K2's state directory."""
    connection = duckdb.connect(database)
    connection.execute("SET extension_directory = ?", [str(state_dir("duckdb", "extensions"))])
    connection.execute("SET TimeZone = 'UTC'")
    return connection


def load_iceberg_extension(connection: duckdb.DuckDBPyConnection) -> None:
    """Load the avro and iceberg extensions (a no-op when loaded)."""
    for package in _EXTENSION_PACKAGES:
        _load_packaged_extension(connection, package)


def _load_packaged_extension(connection: duckdb.DuckDBPyConnection, package: str) -> None:
    """Load the DuckDB extension of a ``duckdb_extension_*`` PyPI package, installing it the first time."""
    name = package.removeprefix("duckdb_extension_")
    if name not in _EXTENSION_NAMES:
        raise ValueError(f"unknown DuckDB extension package {package!r}")
    try:
        connection.execute(f"LOAD {name}")  # name is one of the constants of _EXTENSION_NAMES
    except duckdb.Error:
        # INSTALL takes no bound parameters; the path is the installed package's own file.
        path = str(_packaged_extension(package)).replace("'", "''")
        connection.execute(f"FORCE INSTALL '{path}'")
        connection.execute(f"LOAD {name}")


def use_object_store(connection: duckdb.DuckDBPyConnection, properties: dict[str, str]) -> None:
    """Let ``connection`` read the S3 store named by pyiceberg's ``s3.*`` catalog properties (a no-op
    without ``s3.endpoint``): the httpfs extension and a session secret holding the store's keys."""
    endpoint = properties.get("s3.endpoint")
    if not endpoint:
        return
    _load_packaged_extension(connection, "duckdb_extension_httpfs")
    parsed = urlparse(endpoint if "://" in endpoint else f"http://{endpoint}")
    path_style = properties.get("s3.path-style-access", "true").lower() == "true"
    connection.execute(
        "CREATE OR REPLACE SECRET k2_s3 (TYPE s3, KEY_ID ?, SECRET ?, REGION ?, ENDPOINT ?, URL_STYLE ?, USE_SSL ?)",
        [
            properties.get("s3.access-key-id", ""),
            properties.get("s3.secret-access-key", ""),
            properties.get("s3.region", "us-east-1"),
            parsed.netloc,
            "path" if path_style else "vhost",
            parsed.scheme == "https",
        ],
    )
