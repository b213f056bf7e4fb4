"""`k2 metrics`: the exporter reports lag, throughput, commit latency and table statistics."""

from __future__ import annotations

import urllib.request

import pytest
from dagster import DagsterInstance

from k2_resources.kafka import KafkaResource
from k2_resources.kafka_broker import free_port
from k2_resources.metrics import REGISTRY, serve_metrics, stop_metrics
from k2_resources.operations.exporter import MetricsPoller
from k2_sensors.binance.driver import drive
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.stream import stream_defs

pytestmark = pytest.mark.integration


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_exporter_reports_the_flow_from_kafka_iceberg_and_dagster(k2_home, kafka_broker, topic_name):
    kafka = KafkaResource()
    kafka.ensure_topic(topic_name, partitions=3)
    produce(kafka, topic_name, recorded_trades(600))
    with DagsterInstance.ephemeral() as instance:
        poller = MetricsPoller(topic=topic_name, instance=instance)
        poller.poll()
        lag_before = sum(_sample("k2_consumer_lag_messages", topic=topic_name, partition=str(p)) or 0 for p in range(3))
        assert lag_before == 600
        assert _sample("k2_kafka_end_offsets", topic=topic_name) == 600

        drive(instance, stream_defs(topic_name, max_batch=250), until=lambda r: r.lag == 0, timeout_s=300)
        commits_before = _sample("k2_iceberg_commit_seconds_count") or 0
        poller.poll()

    assert sum(_sample("k2_consumer_lag_messages", topic=topic_name, partition=str(p)) for p in range(3)) == 0
    assert _sample("k2_iceberg_committed_offsets", topic=topic_name) == 600
    assert (_sample("k2_iceberg_commit_seconds_count") or 0) - commits_before >= 3  # 3 partitions, 200 each
    assert _sample("k2_iceberg_table_records", table="market.trades") == 600
    assert _sample("k2_exporter_last_poll_failed", source="kafka") == 0

    port = free_port()
    serve_metrics(port)
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        stop_metrics(port)
    assert f'k2_iceberg_committed_offsets{{topic="{topic_name}"}} 600.0' in text
    assert "k2_degradation_level" in text
