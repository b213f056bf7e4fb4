"""Where the Iceberg catalog is: its pyiceberg properties from the environment or the defaults.

Kept apart from :mod:`k2_resources.catalog.resource` (which imports Dagster and pyiceberg) so that light
readers such as :mod:`k2_resources.query.sql_query` find the catalog without importing either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from k2_resources.paths import state_dir


def default_catalog_properties() -> dict[str, str]:
    """SQLite catalog and file-system warehouse under K2_HOME."""
    root = state_dir("iceberg")
    return {
        "type": "sql",
        "uri": f"sqlite:///{root / 'catalog.db'}",
        "warehouse": f"file://{state_dir('iceberg', 'warehouse')}",
    }


# Environment variable -> pyiceberg catalog property, beyond the URI and type: a REST catalog's
# credential (``key:secret``, OAuth2 client credentials) and the S3 object store the table files live in.
ENV_CATALOG_PROPERTIES = {
    "K2_ICEBERG_WAREHOUSE": "warehouse",
    "K2_ICEBERG_CATALOG_CREDENTIAL": "credential",
    "K2_S3_ENDPOINT": "s3.endpoint",
    "K2_S3_ACCESS_KEY_ID": "s3.access-key-id",
    "K2_S3_SECRET_ACCESS_KEY": "s3.secret-access-key",
    "K2_S3_REGION": "s3.region",
    "K2_S3_PATH_STYLE_ACCESS": "s3.path-style-access",
}


def env_catalog_properties() -> dict[str, str] | None:
    """Catalog properties from ``K2_ICEBERG_CATALOG_URI`` / ``K2_ICEBERG_CATALOG_TYPE`` and the
    variables of :data:`ENV_CATALOG_PROPERTIES` when the URI is set (an S3 endpoint implies
    path-style access, which local object stores such as SeaweedFS and MinIO need)."""
    uri = os.environ.get("K2_ICEBERG_CATALOG_URI")
    if not uri:
        return None
    props = {"uri": uri, "type": os.environ.get("K2_ICEBERG_CATALOG_TYPE", "sql")}
    for variable, prop in ENV_CATALOG_PROPERTIES.items():
        if os.environ.get(variable):
            props[prop] = os.environ[variable]
    if "s3.endpoint" in props:
        props.setdefault("s3.path-style-access", "true")
    return props


# The reader identity of a store with two (k2_resources.platform.object_store): variable -> the usual one it replaces.
READER_VARIABLES = {
    "K2_ICEBERG_READER_CREDENTIAL": "K2_ICEBERG_CATALOG_CREDENTIAL",
    "K2_S3_READER_ACCESS_KEY_ID": "K2_S3_ACCESS_KEY_ID",
    "K2_S3_READER_SECRET_ACCESS_KEY": "K2_S3_SECRET_ACCESS_KEY",
}


def reader_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the reader's identity under the usual names and the writer's removed, when
    ``env`` names a reader (``K2_S3_READER_ACCESS_KEY_ID``); else ``env`` unchanged."""
    if not env.get("K2_S3_READER_ACCESS_KEY_ID"):
        return dict(env)
    chosen = {name: value for name, value in env.items() if name not in READER_VARIABLES}
    for reader, usual in READER_VARIABLES.items():
        chosen.pop(usual, None)
        if env.get(reader):
            chosen[usual] = env[reader]
    return chosen


def use_reader_identity() -> bool:
    """Make this process a reader: the store's reader identity replaces the writer's in ``os.environ``
    (the writer's secret is dropped, so neither this process nor its children hold it). For processes
    that only read tables (the query API, `k2 query`); True when a reader identity was configured."""
    if not os.environ.get("K2_S3_READER_ACCESS_KEY_ID"):
        return False
    chosen = reader_env(os.environ)
    for name in [name for name in os.environ if name not in chosen]:
        del os.environ[name]
    os.environ.update(chosen)
    return True


def catalog_properties(configured: dict[str, str] | None = None) -> dict[str, str]:
    """``configured``, else the environment's, else the defaults (the order IcebergResource uses)."""
    return dict(configured or env_catalog_properties() or default_catalog_properties())
