"""The Kafka Connect peer's launcher: its pom follows the broker's Kafka, and a missing tool is named."""

from __future__ import annotations

import pytest

from k2_resources.paths import PROJECT_ROOT
from tests.support.kafka_connect import PeerUnavailableError, connect_classpath, versions


def test_the_connect_worker_runs_the_kafka_version_of_the_broker():
    broker_pom = (PROJECT_ROOT / "infra" / "kafka" / "pom.xml").read_text()
    assert f"<kafka.version>{versions()['kafka']}</kafka.version>" in broker_pom
    assert versions()["iceberg"].startswith("1.")


def test_without_maven_the_error_names_maven(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no mvn on it
    with pytest.raises(PeerUnavailableError, match="install Maven"):
        connect_classpath(tmp_path / "cache")
