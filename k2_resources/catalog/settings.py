"""Where the Iceberg catalog is: its pyiceberg properties from the environment or the defaults.

Kept apart from :mod:`k2_resources.catalog.resource` (which imports Dagster and pyiceberg) so that light
readers such as :mod:`k2_resources.query.sql_query` find the catalog without importing either.
"""

from __future__ import annotations

import os

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


def catalog_properties(configured: dict[str, str] | None = None) -> dict[str, str]:
    """``configured``, else the environment's, else the defaults (the order IcebergResource uses)."""
    return dict(configured or env_catalog_properties() or default_catalog_properties())
