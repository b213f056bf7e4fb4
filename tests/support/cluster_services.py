"""The object store + Iceberg REST catalog (SeaweedFS) and Postgres of `k2 cluster`, for tests.

Each is started once per pytest run by a session fixture in tests/conftest.py and stopped at its
end. Kept free of Dagster imports: tests/conftest.py imports it for every run, unit tests included.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.exceptions import NoSuchTableError

from k2_resources.catalog.tables import ALL_TABLES
from k2_resources.platform.cluster_services import TABLE_BUCKET, ObjectStore, Postgres


def running_object_store(home: Path) -> Iterator[ObjectStore]:
    """Start SeaweedFS (S3 + Iceberg REST catalog) in ``home`` on free ports, yield it, stop it afterwards."""
    store = ObjectStore(home)
    try:
        began = time.monotonic()
        store.start()
        print(f"\nobject store + Iceberg REST catalog started in {time.monotonic() - began:.1f}s")
        yield store
    finally:
        store.stop()


def running_postgres() -> Iterator[Postgres]:
    """Start Postgres in a fresh folder, yield it, stop it and delete the folder afterwards.

    The folder is made under the system temp folder, not pytest's: as root, postgres runs as
    another user, which must be able to enter every parent folder (pytest's are private)."""
    home = Path(tempfile.mkdtemp(prefix="k2-postgres-"))
    home.chmod(0o711)
    server = Postgres(home)
    try:
        began = time.monotonic()
        server.start()
        print(f"\nPostgres started in {time.monotonic() - began:.1f}s")
        yield server
    finally:
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


def drop_k2_tables(catalog: Catalog) -> None:
    """Drop every K2 table (the store is shared by the session's tests; each starts from no tables)."""
    for definition in ALL_TABLES:
        try:
            catalog.drop_table(definition.identifier)
        except NoSuchTableError:
            pass


def rest_catalog(store: ObjectStore) -> Catalog:
    return load_catalog("k2-test", **store.catalog_properties())


def s3_objects(store: ObjectStore, prefix: str) -> dict[str, int]:
    """Every object under ``s3://<table bucket>/<prefix>`` with its size, listed through the S3 API itself."""
    env = store.env()
    filesystem = pafs.S3FileSystem(
        access_key=env["K2_S3_ACCESS_KEY_ID"],
        secret_key=env["K2_S3_SECRET_ACCESS_KEY"],
        endpoint_override=env["K2_S3_ENDPOINT"],
        scheme="http",
        region=env["K2_S3_REGION"],
    )
    listed = filesystem.get_file_info(
        pafs.FileSelector(f"{TABLE_BUCKET}/{prefix}", recursive=True, allow_not_found=True)
    )
    return {f"s3://{info.path}": info.size for info in listed if info.type == pafs.FileType.File}
