"""The follower on real Kafka, Iceberg and Dagster: the stream sensor asks for it, it commits trades
produced while it runs, every trade lands exactly once, and each commit is a materialisation with its
offset range (what the UI lists), matching the snapshots that recorded the same ranges."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from dagster import AssetKey, DagsterInstance, Definitions

from k2_assets.binance import defs as binance_defs
from k2_assets.resources import build_resources
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import committed_offsets
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.driver import execute_requests, tick
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_the_sensor_starts_a_follower_that_commits_new_trades_each_second_exactly_once(
    k2_home, kafka_broker, topic_name
):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    records = recorded_trades(6000)
    first, second = records[:3000], records[3000:]
    produce(kafka, topic_name, first)
    resources = build_resources()
    resources["sink"] = TradeSinkResource(
        topic=topic_name, max_batch_messages=50_000, follow_seconds=20, follow_interval_seconds=0.5
    )
    defs = Definitions.merge(binance_defs, Definitions(resources=resources))

    def produce_the_rest_once_the_first_lot_is_in() -> None:
        wait_for(
            lambda: sum(committed_offsets(iceberg.trades(), topic_name).values()) >= len(first),
            120,
            "the first lot committed by the follower",
            interval_s=0.5,
        )
        produce(kafka, topic_name, second)

    with DagsterInstance.ephemeral() as instance:
        result = tick(instance, defs, None)
        assert [r.run_config["ops"]["binance_trades"]["config"]["mode"] for r in result.run_requests] == ["follow"]
        producer = threading.Thread(target=produce_the_rest_once_the_first_lot_is_in, daemon=True)
        producer.start()
        assert execute_requests(instance, defs, result) == (1, 0)  # returns when its 20 s are up
        producer.join(timeout=60)
        events = instance.fetch_materializations(AssetKey("binance_trades"), limit=1000).records
        # the next tick sees the follower finished and, with nothing new, requests nothing
        assert tick(instance, defs, result.cursor).run_requests == []

    trade_ids = Counter(iceberg.trades().scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist())
    assert trade_ids == Counter(r["trade_id"] for r in records)  # each trade once, none missing
    snapshots = {
        (int(p["k2.kafka.partition"]), int(p["k2.kafka.start-offset"]), int(p["k2.kafka.end-offset"]))
        for s in iceberg.trades().snapshots()
        if (p := s.summary.additional_properties if s.summary else {}).get("k2.kafka.topic") == topic_name
    }
    per_commit = [
        e.asset_materialization.metadata for e in events if "start_offset" in e.asset_materialization.metadata
    ]
    reported = {(m["partition"].value, m["start_offset"].value, m["end_offset"].value) for m in per_commit}
    assert reported == snapshots
    assert len(snapshots) > 3  # the second lot came in commits of its own, while the follower ran
    for partition in range(3):
        ranges = sorted((start, end) for p, start, end in snapshots if p == partition)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"partition {partition}: {ranges}"
    summary = [e.asset_materialization.metadata for e in events if "ended_because" in e.asset_materialization.metadata]
    assert len(summary) == 1 and summary[0]["commits"].value == len(snapshots)
