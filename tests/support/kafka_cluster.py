"""The local 3-broker KRaft cluster for tests: started once per pytest run, stopped at its end.

Kept free of Dagster imports: tests/conftest.py imports it for every run, unit tests included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType

from k2_resources.kafka.security import ADMIN, client_security
from k2_resources.platform.kafka_cluster import KafkaCluster


def running_kafka_cluster(home: Path) -> Iterator[KafkaCluster]:
    """Start a cluster in ``home`` on free ports, yield it, and stop every node afterwards."""
    cluster = KafkaCluster(home=home)
    try:
        cluster.start()
        print(f"\nlocal Kafka cluster ({cluster.size} brokers) started in {cluster.started_in_s:.1f}s")
        yield cluster
    finally:
        cluster.stop()


def partition_replicas(bootstrap_servers: str, topic: str) -> dict[int, dict]:
    """Per partition of ``topic``: its leader, replicas and in-sync replicas (broker ids)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_security(ADMIN).kafka_python())
    try:
        [described] = admin.describe_topics([topic])
        return {
            p["partition_index"]: {
                "leader": p["leader_id"],
                "replicas": sorted(p["replica_nodes"]),
                "isr": sorted(p["isr_nodes"]),
            }
            for p in described["partitions"]
        }
    finally:
        admin.close()


def topic_settings(bootstrap_servers: str, topic: str) -> dict[str, str]:
    """The settings of ``topic`` that differ from Kafka's defaults (name -> value)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_security(ADMIN).kafka_python())
    try:
        result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        admin.close()
    return {name: entry["value"] for name, entry in result["topic"][topic].items()}
