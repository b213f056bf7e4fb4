"""The follower on real Kafka, Iceberg and Dagster: the stream sensor asks for it, it commits trades
produced while it runs, every trade lands exactly once, and its commits are materialisations per report
window whose offset ranges cover exactly the snapshots that recorded the same ranges."""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace

import pytest
from dagster import AssetKey, DagsterInstance, Definitions

from k2_assets.binance import defs as binance_defs
from k2_assets.resources import build_resources
from k2_resources.catalog.resource import IcebergResource, ensure_tables
from k2_resources.degradation.levels import system_memory_percent
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.follow import FollowSettings, follow_topic
from k2_resources.sink.offsets import committed_offsets
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.driver import checks_of, drive, execute_requests, tick
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.stream import (
    FOLLOWER,
    assert_contiguous,
    execute_in_background,
    follower_endings,
    range_commits,
    requested_modes,
    stream_defs,
)
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
def test_the_sensor_starts_a_follower_that_commits_new_trades_each_second_exactly_once(
    k2_home, kafka_broker, topic_name, tmp_path
):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    records = recorded_trades(6000)
    first, second = records[:3000], records[3000:]
    produce(kafka, topic_name, first)
    resources = build_resources()
    resources["sink"] = TradeSinkResource(
        topic=topic_name,
        max_batch_messages=50_000,
        follow_seconds=20,
        follow_interval_seconds=0.5,
        follow_report_seconds=4,
    )
    defs = Definitions.merge(binance_defs, Definitions(resources=resources))

    def windows_logged(instance: DagsterInstance) -> int:
        records = instance.fetch_materializations(AssetKey("binance_trades"), limit=1000).records
        return sum("window_commits" in r.asset_materialization.metadata for r in records if r.asset_materialization)

    def produce_the_rest_once_the_first_window_is_logged(instance: DagsterInstance) -> None:
        # The first lot's commits are logged within 4 s though the stream is quiet after them; the
        # second lot then lands in a later window.
        wait_for(lambda: windows_logged(instance) >= 1, 120, "the first report window logged", interval_s=0.5)
        produce(kafka, topic_name, second)

    # On disk: the producer thread reads the instance while the run writes to it.
    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(tempdir=str(tmp_path / "dagster")) as instance:
        result = tick(instance, defs, None)
        assert [r.run_config["ops"]["binance_trades"]["config"]["mode"] for r in result.run_requests] == ["follow"]
        producer = threading.Thread(target=produce_the_rest_once_the_first_window_is_logged, args=(instance,))
        producer.start()
        assert execute_requests(instance, defs, result) == (1, [])  # returns when its 20 s are up
        producer.join(timeout=60)
        assert not producer.is_alive()
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
    windows = [e.asset_materialization.metadata for e in events if "window_commits" in e.asset_materialization.metadata]
    assert len(windows) > 1  # windows of 4 s while it ran, then the run's result closing the last
    assert sum(w["window_commits"].value for w in windows) == len(snapshots)
    assert len(snapshots) > 3  # the second lot came in commits of its own, while the follower ran
    for partition in range(3):
        ranges = sorted((start, end) for p, start, end in snapshots if p == partition)
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])), f"partition {partition}: {ranges}"
        spans = sorted(
            tuple(w["offset_ranges"].value[str(partition)])
            for w in windows
            if str(partition) in w["offset_ranges"].value
        )
        # the windows cover the partition's snapshots exactly: contiguous, from the first range to the last
        assert spans[0][0] == ranges[0][0] and spans[-1][1] == ranges[-1][1], (spans, ranges)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), f"partition {partition}: {spans}"
    summary = [e.asset_materialization.metadata for e in events if "ended_because" in e.asset_materialization.metadata]
    assert len(summary) == 1 and summary[0]["commits"].value == len(snapshots)


MEMORY_HEADROOM_PERCENT = 4.0  # the SOFT memory trigger: this far above the machine's memory in use now
BALLAST_PERCENT = 8.0  # what the test then holds: twice the headroom (the machine is shared)


@pytest.mark.timeout(600)
def test_a_follower_hands_back_to_the_sensor_when_memory_reaches_the_soft_trigger(k2_home, kafka_broker, topic_name):
    """Real memory: the test holds a ballast while a follower runs; the follower stops at its next cycle,
    the sensor (memory at SOFT) then requests runs per range instead of a follower, and once the memory
    is freed the trades land exactly once."""
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    records = recorded_trades(3000)
    produce(kafka, topic_name, records[:1500])
    trigger = min(system_memory_percent() + MEMORY_HEADROOM_PERCENT, 90.0)
    degradation = DegradationResource(
        lag_triggers=[100_000, 200_000, 300_000, 400_000],
        memory_triggers_percent=[trigger, 101.0, 102.0, 103.0],  # SOFT only
        cooldown_seconds=1.0,
    )
    defs = stream_defs(topic_name, 1_000, FOLLOWER, follow_seconds=240, degradation=degradation)
    with DagsterInstance.ephemeral() as instance:
        first = tick(instance, defs, None)
        assert requested_modes(first) == ["follow"], checks_of(first)["degradation_level"]
        follower = execute_in_background(instance, defs, first)
        wait_for(
            lambda: sum(committed_offsets(iceberg.trades(), topic_name).values()) == 1500,
            timeout_s=120,
            what="the follower to commit the first trades",
        )
        ballast = b"\x01" * int(_mem_total_bytes() * BALLAST_PERCENT / 100)  # written: resident, not reserved
        try:
            assert system_memory_percent() >= trigger
            assert follower.join(timeout_s=60) == (1, [])  # ends at its next cycle, not after 240 s
            assert follower_endings(instance) == ["memory at the SOFT trigger"]
            produce(kafka, topic_name, records[1500:])
            second = tick(instance, defs, first.cursor)
            assert checks_of(second)["degradation_level"]["metadata"]["level"] == "SOFT"
            assert requested_modes(second) == ["ingest"] * 3  # runs per range at SOFT, no follower
            assert execute_requests(instance, defs, second) == (3, [])
        finally:
            del ballast
        report = drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300, cursor=second.cursor)
        assert report.failed_runs == 0

    trade_ids = Counter(iceberg.trades().scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist())
    assert trade_ids == Counter(r["trade_id"] for r in records)
    assert_contiguous(range_commits(iceberg.trades(), topic_name))


def _mem_total_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


@pytest.mark.timeout(300)
def test_a_follower_asked_to_stop_ends_after_a_whole_cycle_and_the_next_one_continues(
    k2_home, kafka_broker, topic_name
):
    """``follow_topic``'s ``should_stop`` on real Kafka and Iceberg: the stop is honoured between cycles,
    so every commit is whole, and a follower started afterwards commits the rest from the table's offsets."""
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    ensure_tables(iceberg.catalog())  # what the sink's run does before it follows
    records = recorded_trades(2400)
    produce(kafka, topic_name, records[:1200])
    stop = threading.Event()
    settings = FollowSettings(interval_s=0.2, run_for_s=240, max_batch_messages=300)
    outcome: dict = {}

    def follow() -> None:
        outcome["first"] = follow_topic(kafka, iceberg, topic_name, settings, lambda _: None, should_stop=stop.is_set)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()

    def committing() -> bool:
        assert thread.is_alive(), "the follower ended before it was asked to stop"
        return sum(committed_offsets(iceberg.trades(), topic_name).values()) > 0

    wait_for(
        committing,
        timeout_s=120,
        what="the follower's first commits",
        interval_s=0.05,
    )
    stop.set()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the follower did not stop"
    first = outcome["first"]
    assert first.reason == "asked to stop"
    committed = committed_offsets(iceberg.trades(), topic_name)
    # whole ranges of at most 300 from 0 (400 per partition: [0, 300) then [300, 400)), nothing else
    assert all(offset in (300, 400) for offset in committed.values()), committed
    in_table = iceberg.trades().scan(selected_fields=("trade_id",)).to_arrow().num_rows
    assert in_table == first.rows_written == sum(committed.values())

    produce(kafka, topic_name, records[1200:])
    one_cycle = replace(settings, run_for_s=0)  # a follower that ends after its first cycle
    while sum(committed_offsets(iceberg.trades(), topic_name).values()) < len(records):
        following = follow_topic(kafka, iceberg, topic_name, one_cycle, lambda _: None)
        assert following.commits > 0, "a cycle with new offsets committed nothing"
    trade_ids = Counter(iceberg.trades().scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist())
    assert trade_ids == Counter(r["trade_id"] for r in records)
    assert_contiguous(range_commits(iceberg.trades(), topic_name))
