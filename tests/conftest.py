"""Shared fixtures: one real Kafka broker per pytest run, and a fresh K2_HOME per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from tests.support.cluster_services import running_object_store, running_postgres
from tests.support.kafka_cluster import running_kafka_cluster
from tests.support.spark import running_spark_lake


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory):
    """A real Apache Kafka (KRaft) broker on free ports, for the whole test session."""
    broker = KafkaBroker(home=tmp_path_factory.mktemp("kafka"), port=free_port(), controller_port=free_port())
    broker.start()
    previous = os.environ.get("K2_KAFKA_BOOTSTRAP")
    os.environ["K2_KAFKA_BOOTSTRAP"] = broker.bootstrap_servers
    yield broker
    if previous is None:
        os.environ.pop("K2_KAFKA_BOOTSTRAP", None)
    else:
        os.environ["K2_KAFKA_BOOTSTRAP"] = previous
    broker.stop()


@pytest.fixture(scope="session")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real 3-broker KRaft cluster (replication 3, min ISR 2) on free ports, for the whole test session.

    It does not set K2_KAFKA_BOOTSTRAP (other tests use `kafka_broker`): point K2 at
    ``kafka_cluster.bootstrap_servers`` yourself."""
    yield from running_kafka_cluster(tmp_path_factory.mktemp("kafka-cluster"))


@pytest.fixture(scope="session")
def object_store(tmp_path_factory: pytest.TempPathFactory):
    """SeaweedFS (S3 + Iceberg REST catalog, `k2 cluster`'s object store) on free ports, for the whole
    test session. Tests point K2 at it with ``object_store.env()``."""
    yield from running_object_store(tmp_path_factory.mktemp("object-store"))


@pytest.fixture(scope="session")
def postgres_server():
    """Postgres (`k2 cluster`'s Dagster storage) on a free port, database `dagster`, for the whole test
    session. Tests point Dagster at it with ``postgres_server.env()``."""
    yield from running_postgres()


@pytest.fixture(scope="session")
def spark_lake(tmp_path_factory: pytest.TempPathFactory):
    """One local[2] Spark session per pytest run, over a K2 lake of its own (``spark_lake.catalog_properties()``):
    Spark keeps a catalog for the session's life, so the Spark tests share that lake."""
    yield from running_spark_lake(tmp_path_factory.mktemp("spark-lake"))


@pytest.fixture
def k2_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty K2_HOME (Iceberg catalog, warehouse, Dagster home) for one test."""
    home = tmp_path / "k2home"
    home.mkdir()
    monkeypatch.setenv("K2_HOME", str(home))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return home


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name unique to the test, so tests sharing the broker never see each other's data."""
    safe = "".join(ch if ch.isalnum() else "-" for ch in request.node.name)[:80]
    return f"test-{safe}-{os.getpid()}-{free_port()}"
