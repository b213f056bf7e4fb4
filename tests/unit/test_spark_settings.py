"""How K2's catalog settings become Spark's, and the analytics engine setting (no Spark started)."""

from __future__ import annotations

import pytest

from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.analytics.spark import SparkResource
from k2_resources.analytics.spark_session import spark_catalog_conf, spark_jars
from k2_resources.errors import K2Error


def test_the_embedded_sqlite_catalog_becomes_a_jdbc_catalog_over_the_same_database() -> None:
    conf = spark_catalog_conf(
        "k2",
        {"type": "sql", "uri": "sqlite:////srv/k2/iceberg/catalog.db", "warehouse": "file:///srv/k2/iceberg/warehouse"},
    )
    assert conf == {
        "spark.sql.catalog.k2": "org.apache.iceberg.spark.SparkCatalog",
        "spark.sql.catalog.k2.cache-enabled": "false",
        "spark.sql.catalog.k2.catalog-impl": "org.apache.iceberg.jdbc.JdbcCatalog",
        "spark.sql.catalog.k2.jdbc.init-catalog-tables": "false",
        "spark.sql.catalog.k2.uri": "jdbc:sqlite:/srv/k2/iceberg/catalog.db",
        "spark.sql.catalog.k2.warehouse": "file:///srv/k2/iceberg/warehouse",
    }


def test_a_postgres_sql_catalog_gets_its_jdbc_url_and_login() -> None:
    conf = spark_catalog_conf("k2", {"type": "sql", "uri": "postgresql+psycopg2://k2:s%40cret@db.internal:5433/lake"})
    assert conf["spark.sql.catalog.k2.uri"] == "jdbc:postgresql://db.internal:5433/lake"
    assert conf["spark.sql.catalog.k2.jdbc.user"] == "k2"
    assert conf["spark.sql.catalog.k2.jdbc.password"] == "s@cret"


def test_a_rest_catalog_on_s3_keeps_uri_credential_and_object_store_settings() -> None:
    conf = spark_catalog_conf(
        "lake",
        {
            "type": "rest",
            "uri": "http://127.0.0.1:8181",
            "warehouse": "s3://k2lake/",
            "credential": "key:secret",
            "s3.endpoint": "http://127.0.0.1:8333",
            "s3.access-key-id": "key",
            "s3.secret-access-key": "secret",
            "s3.region": "eu-west-1",
            "s3.path-style-access": "true",
        },
    )
    prefix = "spark.sql.catalog.lake"
    assert {key: value for key, value in conf.items() if key != prefix} == {
        f"{prefix}.cache-enabled": "false",
        f"{prefix}.type": "rest",
        f"{prefix}.uri": "http://127.0.0.1:8181",
        f"{prefix}.warehouse": "s3://k2lake/",
        f"{prefix}.credential": "key:secret",
        f"{prefix}.io-impl": "org.apache.iceberg.aws.s3.S3FileIO",
        f"{prefix}.s3.endpoint": "http://127.0.0.1:8333",
        f"{prefix}.s3.access-key-id": "key",
        f"{prefix}.s3.secret-access-key": "secret",
        f"{prefix}.s3.path-style-access": "true",
        f"{prefix}.client.region": "eu-west-1",
    }


def test_a_catalog_spark_cannot_open_is_one_clear_error() -> None:
    with pytest.raises(K2Error, match="Spark cannot open the SQL catalog 'mysql'"):
        spark_catalog_conf("k2", {"type": "sql", "uri": "mysql://user:pw@host/db"})
    with pytest.raises(K2Error, match="Spark cannot use a 'glue' catalog"):
        spark_catalog_conf("k2", {"type": "glue"})


def test_engine_and_master_come_from_the_environment_with_working_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("K2_ANALYTICS_ENGINE", raising=False)
    monkeypatch.delenv("K2_SPARK_MASTER", raising=False)
    assert AnalyticsEngineResource().name == "polars"
    assert SparkResource().master == "local[2]"
    monkeypatch.setenv("K2_ANALYTICS_ENGINE", "Spark")
    monkeypatch.setenv("K2_SPARK_MASTER", "spark://10.0.0.5:7077")
    assert AnalyticsEngineResource().name == "spark"
    assert AnalyticsEngineResource().spark.master == "spark://10.0.0.5:7077"
    monkeypatch.setenv("K2_ANALYTICS_ENGINE", "pandas")
    with pytest.raises(K2Error, match="K2_ANALYTICS_ENGINE='pandas' is not an engine; use one of polars, spark"):
        _ = AnalyticsEngineResource().name


def test_without_maven_the_spark_jars_are_one_clear_error(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn here
    with pytest.raises(K2Error, match=r"`mvn` was not found on PATH; install Maven .* Iceberg jars for Spark"):
        spark_jars(cache_dir=tmp_path / "spark")
