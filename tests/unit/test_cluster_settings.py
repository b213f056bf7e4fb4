"""How K2 finds a REST catalog and S3 store from the environment, and names them when they are down."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from requests.exceptions import ConnectionError as RequestsConnectionError

from k2_assets.cli import cluster as cluster_cli
from k2_resources.catalog.errors import CatalogUnavailableError, catalog_unavailable, explaining_catalog_errors
from k2_resources.catalog.settings import env_catalog_properties
from k2_resources.operations.dagster_instance import (
    EMBEDDED_INSTANCE_CONFIG,
    POSTGRES_INSTANCE_CONFIG,
    instance_config_for_environment,
    instance_storage_problem,
)
from k2_resources.platform.cluster_env import env_file
from k2_resources.platform.kafka_broker import free_port
from k2_resources.trades.iceberg_read import object_store_options

CLUSTER_ENV = {
    "K2_ICEBERG_CATALOG_TYPE": "rest",
    "K2_ICEBERG_CATALOG_URI": "http://127.0.0.1:18181",
    "K2_ICEBERG_WAREHOUSE": "s3://k2lake/",
    "K2_ICEBERG_CATALOG_CREDENTIAL": "key:secret",
    "K2_S3_ENDPOINT": "http://127.0.0.1:18333",
    "K2_S3_ACCESS_KEY_ID": "key",
    "K2_S3_SECRET_ACCESS_KEY": "secret",
    "K2_S3_REGION": "us-east-1",
}


@pytest.fixture
def cluster_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in CLUSTER_ENV.items():
        monkeypatch.setenv(name, value)


def test_the_environment_alone_configures_a_rest_catalog_on_s3(cluster_env):
    assert env_catalog_properties() == {
        "type": "rest",
        "uri": "http://127.0.0.1:18181",
        "warehouse": "s3://k2lake/",
        "credential": "key:secret",
        "s3.endpoint": "http://127.0.0.1:18333",
        "s3.access-key-id": "key",
        "s3.secret-access-key": "secret",
        "s3.region": "us-east-1",
        "s3.path-style-access": "true",
    }


def test_virtual_host_addressing_can_be_chosen_and_nothing_is_read_without_a_uri(cluster_env, monkeypatch):
    monkeypatch.setenv("K2_S3_PATH_STYLE_ACCESS", "false")
    assert env_catalog_properties()["s3.path-style-access"] == "false"
    monkeypatch.delenv("K2_ICEBERG_CATALOG_URI")
    assert env_catalog_properties() is None


def test_a_refused_catalog_connection_names_the_catalog_its_variable_and_the_fix(cluster_env):
    error = catalog_unavailable(RequestsConnectionError("HTTPConnectionPool(host='127.0.0.1', port=18181): refused"))
    assert error is not None
    assert "Iceberg REST catalog at http://127.0.0.1:18181 (K2_ICEBERG_CATALOG_URI)" in str(error)
    assert "k2 cluster start" in str(error)


def test_an_unreachable_store_names_the_s3_endpoint(cluster_env):
    wrapped = RuntimeError("write failed")
    wrapped.__cause__ = OSError(
        "AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7, Couldn't connect"
    )
    error = catalog_unavailable(wrapped)
    assert error is not None and "http://127.0.0.1:18333 (K2_S3_ENDPOINT)" in str(error)


def test_other_errors_pass_through_unchanged(cluster_env):
    assert catalog_unavailable(ValueError("schema mismatch")) is None
    with pytest.raises(ValueError, match="schema mismatch"):
        with explaining_catalog_errors():
            raise ValueError("schema mismatch")
    with pytest.raises(CatalogUnavailableError):
        with explaining_catalog_errors():
            raise RequestsConnectionError("refused")


def test_polars_reads_s3_files_with_the_tables_endpoint_and_keys():
    table = SimpleNamespace(
        io=SimpleNamespace(
            properties={
                "s3.endpoint": "http://127.0.0.1:18333",
                "s3.access-key-id": "key",
                "s3.secret-access-key": "secret",
                "s3.region": "eu-west-1",
            }
        )
    )
    assert object_store_options(table, ["s3://k2lake/market/trades/data/a.parquet"]) == {
        "aws_access_key_id": "key",
        "aws_secret_access_key": "secret",
        "aws_region": "eu-west-1",
        "aws_endpoint_url": "http://127.0.0.1:18333",
        "aws_allow_http": "true",
    }
    assert object_store_options(table, ["/k2/iceberg/warehouse/a.parquet"]) is None


def test_k2_run_installs_the_postgres_instance_file_when_the_cluster_names_postgres(monkeypatch):
    monkeypatch.delenv("DAGSTER_POSTGRES_HOST", raising=False)
    assert instance_config_for_environment() == EMBEDDED_INSTANCE_CONFIG
    monkeypatch.setenv("DAGSTER_POSTGRES_HOST", "127.0.0.1")
    assert instance_config_for_environment() == POSTGRES_INSTANCE_CONFIG


def test_an_instance_whose_postgres_does_not_answer_is_named_with_the_fix(tmp_path: Path, monkeypatch):
    (tmp_path / "dagster.yaml").write_text(POSTGRES_INSTANCE_CONFIG.read_text())
    for variable, value in {
        "DAGSTER_POSTGRES_HOST": "127.0.0.1",
        "DAGSTER_POSTGRES_PORT": str(free_port()),
        "DAGSTER_POSTGRES_USER": "k2",
        "DAGSTER_POSTGRES_PASSWORD": "x",
        "DAGSTER_POSTGRES_DB": "dagster",
    }.items():
        monkeypatch.setenv(variable, value)
    problem = instance_storage_problem(tmp_path)
    assert problem is not None and "127.0.0.1" in problem and "k2 cluster start" in problem
    (tmp_path / "dagster.yaml").write_text(EMBEDDED_INSTANCE_CONFIG.read_text())
    assert instance_storage_problem(tmp_path) is None  # SQLite: no server to lose


def test_cluster_start_prints_where_secrets_are_not_their_values(
    k2_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    class Service:
        name = "object store"

        def start(self) -> dict[str, str]:
            return {
                "K2_S3_ENDPOINT": "http://127.0.0.1:9000",
                "K2_S3_SECRET_ACCESS_KEY": "s3cr3t-value",
                "DAGSTER_POSTGRES_PASSWORD": "pg-pass-value",
                "K2_ICEBERG_CATALOG_CREDENTIAL": "id:cred-value",
            }

    cluster_cli.start([Service()])  # type: ignore[list-item]
    printed = capsys.readouterr().out
    assert "http://127.0.0.1:9000" in printed
    assert "K2_S3_SECRET_ACCESS_KEY=(set; see the env file)" in printed
    for value in ("s3cr3t-value", "pg-pass-value", "cred-value"):
        assert value not in printed
    assert "s3cr3t-value" in env_file(k2_home / "cluster").read_text()  # the file holds them
