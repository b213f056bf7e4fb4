"""One Spark session per pytest run, over a K2 lake of its own (the embedded SQLite catalog, read by
Spark through Iceberg's JdbcCatalog).

Spark keeps a catalog for a session's life, so the session cannot follow each test's K2_HOME:
the Spark tests share this lake (``SparkLake.iceberg()``) and each writes what it reads.
Kept free of Dagster imports: tests/conftest.py imports it for every run, unit tests included.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyiceberg.catalog import load_catalog

from k2_resources.analytics.spark_session import spark_session, stop_spark

CATALOG_NAME = "k2"


@dataclass(frozen=True)
class SparkLake:
    """The shared Spark session, the lake's folder and how long the session took to start."""

    session: Any  # pyspark.sql.SparkSession
    home: Path
    started_in_seconds: float

    @property
    def catalog_name(self) -> str:
        return CATALOG_NAME

    def catalog_properties(self) -> dict[str, str]:
        """pyiceberg properties of the lake's catalog (what K2's default is under a K2_HOME)."""
        return lake_catalog_properties(self.home)


def lake_catalog_properties(home: Path) -> dict[str, str]:
    return {
        "type": "sql",
        "uri": f"sqlite:///{home / 'iceberg' / 'catalog.db'}",
        "warehouse": f"file://{home / 'iceberg' / 'warehouse'}",
    }


def running_spark_lake(home: Path) -> Iterator[SparkLake]:
    """Create the lake's catalog (pyiceberg first: it makes the catalog tables both sides use), start a
    local[2] Spark session on it, yield, and stop the session afterwards."""
    (home / "iceberg" / "warehouse").mkdir(parents=True, exist_ok=True)
    load_catalog(CATALOG_NAME, **lake_catalog_properties(home)).list_namespaces()
    try:
        began = time.monotonic()
        session = spark_session("local[2]", CATALOG_NAME, lake_catalog_properties(home))
        elapsed = time.monotonic() - began
        print(f"\nSpark session (local[2]) started in {elapsed:.1f}s")
        yield SparkLake(session=session, home=home, started_in_seconds=elapsed)
    finally:
        stop_spark()
