"""Where the Iceberg catalog is: its pyiceberg properties from the environment or the defaults.

Kept apart from :mod:`k2_resources.iceberg` (which imports Dagster and pyiceberg) so that light
readers such as :mod:`k2_resources.sql_query` find the catalog without importing either.
"""

from __future__ import annotations

import os

from k2_resources.settings import state_dir


def default_catalog_properties() -> dict[str, str]:
    """SQLite catalog and file-system warehouse under K2_HOME."""
    root = state_dir("iceberg")
    return {
        "type": "sql",
        "uri": f"sqlite:///{root / 'catalog.db'}",
        "warehouse": f"file://{state_dir('iceberg', 'warehouse')}",
    }


def env_catalog_properties() -> dict[str, str] | None:
    """Catalog properties from ``K2_ICEBERG_CATALOG_URI`` / ``K2_ICEBERG_WAREHOUSE`` when set."""
    uri = os.environ.get("K2_ICEBERG_CATALOG_URI")
    if not uri:
        return None
    props = {"uri": uri, "type": os.environ.get("K2_ICEBERG_CATALOG_TYPE", "sql")}
    if os.environ.get("K2_ICEBERG_WAREHOUSE"):
        props["warehouse"] = os.environ["K2_ICEBERG_WAREHOUSE"]
    return props


def catalog_properties(configured: dict[str, str] | None = None) -> dict[str, str]:
    """``configured``, else the environment's, else the defaults (the order IcebergResource uses)."""
    return dict(configured or env_catalog_properties() or default_catalog_properties())
