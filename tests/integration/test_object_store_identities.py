"""The object store's two identities (issue 24): the reader reads every table file but cannot delete
one, write one or drop the table; the credentials are 0600 files; no log of the store holds a secret.

Real SeaweedFS (the session's ``object_store``), the reader identity taken the way a reading process
takes it (``reader_env`` of the env `k2 cluster` writes). Its own namespace: other tests drop K2's tables.
"""

from __future__ import annotations

import os
import stat

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from pyiceberg.catalog import load_catalog
from pyiceberg.exceptions import NoSuchTableError

from k2_resources.catalog.settings import env_catalog_properties, reader_env
from k2_resources.platform.object_store import TABLE_BUCKET

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

NAMESPACE = "security_probe"


def _s3(env: dict[str, str]) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        access_key=env["K2_S3_ACCESS_KEY_ID"],
        secret_key=env["K2_S3_SECRET_ACCESS_KEY"],
        endpoint_override=env["K2_S3_ENDPOINT"],
        scheme="http",
        region=env["K2_S3_REGION"],
    )


def _catalog(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, name: str):
    for variable in [v for v in os.environ if v.startswith(("K2_S3_", "K2_ICEBERG_"))]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    properties = env_catalog_properties()
    assert properties is not None
    return load_catalog(name, **properties)


def test_the_reader_identity_reads_a_table_but_cannot_delete_write_or_drop_it(object_store, monkeypatch):
    writer_env = object_store.env()
    reader = reader_env(writer_env)
    assert reader["K2_S3_ACCESS_KEY_ID"] == object_store.reader_credentials()["access_key_id"]
    assert writer_env["K2_S3_SECRET_ACCESS_KEY"] not in reader.values()  # the writer's secret is gone

    writer = _catalog(writer_env, monkeypatch, "writer")
    writer.create_namespace_if_not_exists(NAMESPACE)
    identifier = f"{NAMESPACE}.table_{os.getpid()}"
    table = writer.create_table_if_not_exists(identifier, schema=pa.schema([("n", pa.int64())]))
    table.append(pa.table({"n": list(range(100))}))
    data_file = next(iter(table.scan().plan_files())).file.file_path
    key = data_file.removeprefix("s3://")
    assert key.startswith(f"{TABLE_BUCKET}/")

    readers_catalog = _catalog(reader, monkeypatch, "reader")
    seen = readers_catalog.load_table(identifier)
    assert seen.scan().to_arrow().num_rows == 100  # reads the metadata and the data files

    refused = _s3(reader)
    with pytest.raises(OSError, match="ACCESS_DENIED|Access Denied"):
        refused.delete_file(key)
    with pytest.raises(OSError, match="ACCESS_DENIED|Access Denied"):
        with refused.open_output_stream(f"{TABLE_BUCKET}/{NAMESPACE}/forged.parquet") as out:
            out.write(b"forged")
    with pytest.raises(OSError, match="ACCESS_DENIED|Access Denied"):
        seen.append(pa.table({"n": [-1]}))
    with pytest.raises(NoSuchTableError):  # SeaweedFS answers a refused drop as not found
        readers_catalog.drop_table(identifier)

    # Nothing the reader tried changed the table: the file is there, the rows are the writer's.
    assert _s3(writer_env).get_file_info(key).type == pafs.FileType.File
    after = writer.load_table(identifier)
    assert sorted(after.scan().to_arrow()["n"].to_pylist()) == list(range(100))
    writer.drop_table(identifier)


def test_credentials_are_private_files_and_no_log_of_the_store_holds_a_secret(object_store):
    object_store.reader_credentials()
    for path in (object_store.credentials_file, object_store.reader_credentials_file, object_store.identities_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # The secret keys; an access key id is an identifier that S3 servers log with a refused request.
    secrets = [keys["secret_access_key"] for keys in (object_store.credentials(), object_store.reader_credentials())]
    logs = [object_store.log_file, *(object_store.home / "tmp").glob("weed*")]
    assert any(path.is_file() and path.stat().st_size > 0 for path in logs)
    for path in logs:
        if path.is_file():
            text = path.read_text(errors="replace")
            leaked = [secret[:3] + "..." for secret in secrets if secret in text]
            assert not leaked, f"{path} holds generated secret(s) {leaked}"
