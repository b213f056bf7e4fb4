"""`k2 metrics`: the exporter reports lag, throughput, commit latency and table statistics."""

from __future__ import annotations

import urllib.request

import pytest
from dagster import DagsterInstance, Definitions

from k2_assets.binance import defs as binance_defs
from k2_assets.resources import build_resources
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.metrics import REGISTRY, serve_metrics, stop_metrics
from k2_resources.operations.exporter import MetricsPoller
from k2_resources.platform.kafka_broker import free_port
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.driver import checks_of, drive, execute_requests, tick
from tests.support.producing import produce
from tests.support.recorded import first_binance_records, recorded_trades
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


def test_exporter_counts_shed_rows_level_changes_and_backlogs_the_runs_and_sensor_recorded(
    k2_home, kafka_broker, topic_name
):
    """Runs and sensor ticks serve no metrics; `k2 metrics` derives their counters from the instance."""
    kafka = KafkaResource()
    kafka.ensure_topic(topic_name, partitions=3)
    resources = build_resources()
    resources.update(
        sink=TradeSinkResource(topic=topic_name, max_batch_messages=5_000),
        degradation=DegradationResource(
            lag_triggers=[500, 1_000, 100_000, 200_000],
            memory_triggers_percent=[101.0, 102.0, 103.0, 104.0],
            cooldown_seconds=0,
            tier1_symbols=["BTCUSDT"],
            tier2_symbols=[],
        ),  # ETHUSDT is tier 3
    )
    defs = Definitions.merge(binance_defs, Definitions(resources=resources))

    def transitions(from_level: str, to_level: str) -> float:
        return _sample("k2_degradation_transitions_total", from_level=from_level, to_level=to_level) or 0

    shed_before = _sample("k2_shed_messages_total", symbol="ETHUSDT") or 0
    moves = [("NORMAL", "GRACEFUL"), ("GRACEFUL", "SOFT"), ("SOFT", "NORMAL")]
    before = {move: transitions(*move) for move in moves}
    with DagsterInstance.ephemeral() as instance:
        poller = MetricsPoller(topic=topic_name, instance=instance)
        result = tick(instance, defs, None)  # empty topic: NORMAL
        poller.poll()
        produce(kafka, topic_name, first_binance_records("BTCUSDT", 600) + first_binance_records("ETHUSDT", 600))
        result = tick(instance, defs, result.cursor)
        assert checks_of(result)["degradation_level"]["metadata"]["level"] == "GRACEFUL"
        assert execute_requests(instance, defs, result)[1] == []
        poller.poll()
        assert _sample("k2_deferred_rows") == 600 and _sample("k2_deferred_ranges") >= 1
        assert _sample("k2_spilled_rows") == 0
        assert (_sample("k2_shed_messages_total", symbol="ETHUSDT") or 0) - shed_before == 600
        assert transitions("NORMAL", "GRACEFUL") - before[("NORMAL", "GRACEFUL")] == 1

        levels = []
        for _ in range(4):  # GRACEFUL -> SOFT (recovery runs write the deferred rows) -> NORMAL
            result = tick(instance, defs, result.cursor)
            levels.append(checks_of(result)["degradation_level"]["metadata"]["level"])
            assert execute_requests(instance, defs, result)[1] == []
        poller.poll()

    assert levels[:2] == ["SOFT", "NORMAL"], levels
    assert {move: transitions(*move) - before[move] for move in moves} == dict.fromkeys(moves, 1)
    assert _sample("k2_deferred_rows") == 0 and _sample("k2_deferred_ranges") == 0
    assert (_sample("k2_shed_messages_total", symbol="ETHUSDT") or 0) - shed_before == 600  # counted once
    assert (
        sum(
            IcebergResource().trades().scan().to_arrow().column("symbol").to_pylist().count(s)
            for s in ("BTCUSDT", "ETHUSDT")
        )
        == 1200
    )


def test_a_catalog_that_is_down_is_logged_by_name_and_fix_and_marked(k2_home, kafka_broker, topic_name, caplog):
    kafka = KafkaResource()
    kafka.ensure_topic(topic_name, partitions=1)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    iceberg = IcebergResource(catalog_properties={"type": "rest", "uri": down})
    with DagsterInstance.ephemeral() as instance, caplog.at_level("WARNING"):
        MetricsPoller(topic=topic_name, instance=instance, kafka=kafka, iceberg=iceberg).poll()
    assert _sample("k2_exporter_last_poll_failed", source="iceberg") == 1
    warnings = [record.getMessage() for record in caplog.records if "metrics poll of" in record.getMessage()]
    assert warnings and all(down in text and "K2_ICEBERG_CATALOG_URI" in text for text in warnings), warnings
