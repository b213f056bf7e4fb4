"""The object store, Iceberg REST catalog and Postgres of the local scale-out topology (`k2 cluster`).

* Object store + catalog (:mod:`k2_resources.platform.object_store`): SeaweedFS, S3 and an Iceberg
  REST catalog in one ``weed mini`` process.
* Postgres (:mod:`k2_resources.platform.postgres`): the Dagster instance's database.

Both listen on 127.0.0.1 only, on ports chosen free at first start and kept in the service's
``state.json`` (so a restart keeps the addresses its clients were given). Each ``start`` is a
no-op when the service runs and returns the environment variables a K2 process needs to use it.
This module names them as `k2 cluster` services, and gives their classes under one roof.
"""

from __future__ import annotations

from collections.abc import Callable

from k2_resources.platform.cluster_env import ClusterService
from k2_resources.platform.errors import ClusterServiceError
from k2_resources.platform.object_store import (
    S3_REGION,
    TABLE_BUCKET,
    ObjectStore,
    object_store,
    object_store_status,
    start_object_store,
    stop_object_store,
    weed_binary,
)
from k2_resources.platform.postgres import (
    DAGSTER_DATABASE,
    POSTGRES_USER,
    Postgres,
    postgres,
    postgres_bin_dir,
    postgres_status,
    start_postgres,
    stop_postgres,
)

__all__ = [
    "DAGSTER_DATABASE",
    "POSTGRES_USER",
    "S3_REGION",
    "TABLE_BUCKET",
    "ClusterServiceError",
    "ObjectStore",
    "Postgres",
    "object_store",
    "object_store_service",
    "object_store_status",
    "postgres",
    "postgres_bin_dir",
    "postgres_service",
    "postgres_status",
    "start_object_store",
    "start_postgres",
    "stop_object_store",
    "stop_postgres",
    "weed_binary",
]


def _service(name: str, make: Callable[[], ObjectStore | Postgres]) -> ClusterService:
    return ClusterService(
        name=name, start=lambda: make().start(), stop=lambda: make().stop(), status=lambda: make().status()
    )


def object_store_service() -> ClusterService:
    """The object store and REST catalog as a `k2 cluster` service."""
    return _service("object store + Iceberg REST catalog (SeaweedFS)", object_store)


def postgres_service() -> ClusterService:
    """Postgres for the Dagster instance as a `k2 cluster` service."""
    return _service("postgres (Dagster instance storage)", postgres)
