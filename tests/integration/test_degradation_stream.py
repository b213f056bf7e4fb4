"""A burst drives the stream path to CIRCUIT_BREAK and back, and every trade lands exactly once.

Real parts only: the session's Kafka broker, Iceberg on disk in a temp K2_HOME, the real stream
sensor and micro-batch job in an ephemeral Dagster instance, the real alert sensor posting to a
real HTTP server. Thresholds are small (lag 1K/3K/6K/10K, 1 s cooldown) so the burst is 30K
real recorded trades; ETHUSDT is configured as tier 3 so GRACEFUL has something to defer.
"""

from __future__ import annotations

import json
import time

import pytest
from dagster import (
    AssetCheckKey,
    AssetKey,
    DagsterInstance,
    Definitions,
    build_sensor_context,
)

from k2_assets.binance import defs as binance_defs
from k2_assets.resources import build_resources
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.resource import DegradationResource
from k2_resources.degradation.spill import SpillStore
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import recover_range
from k2_resources.sink.offsets import (
    OffsetRange,
    committed_offsets,
    pending_key,
    pending_ranges,
)
from k2_sensors.binance.driver import checks_of, execute_requests, tick
from k2_sensors.operations.alerts import AlertWebhookResource, build_alert_sensor
from tests.support.producing import produce
from tests.support.recorded import first_binance_records
from tests.support.stream import (
    PER_RANGE,
    both_sink_modes,
    execute_in_background,
    follower_endings,
    requested_modes,
    sink_resource,
)
from tests.support.waiting import wait_for
from tests.support.webhooks import WebhookReceiver

pytestmark = pytest.mark.integration

BURST = 30_000
FIRST_WAVE = 4_000  # lag 4K: GRACEFUL (WARN) before the rest arrives
FOLLOWED = 600  # follower mode: lag 600 is NORMAL, so a follower starts; the rest arrives while it runs
FOLLOW_S = 20  # the follower's time: it must still be following when the burst arrives
PARTITION_OF = {"BTCUSDT": 0, "ETHUSDT": 1}  # one partition per symbol, as a keyed producer would
LEVEL_CHECK = AssetCheckKey(AssetKey("binance_trades"), "degradation_level")


def recorded_trades_of(symbol: str, count: int) -> list[dict]:
    """The first ``count`` recorded trades of ``symbol`` (the contiguous 8-9 August 2024 recording) as V2 records."""
    return first_binance_records(symbol, count)


def burst_records() -> list[dict]:
    """30K real trades, BTCUSDT and ETHUSDT merged in trade-time order."""
    records = recorded_trades_of("BTCUSDT", 19_904) + recorded_trades_of("ETHUSDT", BURST - 19_904)
    records.sort(key=lambda r: (r["timestamp"], r["symbol"], r["source_sequence"]))
    return records


@both_sink_modes
def test_burst_to_circuit_break_and_back_loses_nothing_and_alerts(k2_home, kafka_broker, topic_name, sink_mode):
    """One run per range: the first wave is in before the first tick (GRACEFUL), then the rest.
    Follower: a follower starts at NORMAL and the burst arrives while it follows: it falls behind
    (lag past half the SOFT trigger) and hands back to the sensor, which takes it from CIRCUIT_BREAK."""
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    records = burst_records()
    degradation = DegradationResource(
        lag_triggers=[1_000, 3_000, 6_000, 10_000],
        memory_triggers_percent=[101.0, 102.0, 103.0, 104.0],  # this test is about lag only
        cooldown_seconds=1.0,
        tier1_symbols=["BTCUSDT"],
        tier2_symbols=[],  # so ETHUSDT is tier 3
    )
    resources = build_resources()
    resources.update(sink=sink_resource(topic_name, 2_000, sink_mode, follow_seconds=FOLLOW_S), degradation=degradation)
    defs = Definitions.merge(binance_defs, Definitions(resources=resources))
    webhook = WebhookReceiver()
    alerts = build_alert_sensor(check_keys=[LEVEL_CHECK], minimum_interval_seconds=1)
    alert_resources = {"alert_webhooks": AlertWebhookResource(urls=[webhook.url])}

    levels: list[str] = []
    cursor: str | None = None
    alert_cursor: str | None = None
    try:
        with DagsterInstance.ephemeral() as instance:

            def step() -> dict[str, dict]:
                nonlocal cursor, alert_cursor
                result = tick(instance, defs, cursor)
                cursor = result.cursor
                checks = checks_of(result)
                levels.append(checks["degradation_level"]["metadata"]["level"])
                runs, failed = execute_requests(instance, defs, result)
                assert not failed, f"{len(failed)} of {runs} micro-batch runs failed: {failed}"
                with build_sensor_context(instance=instance, cursor=alert_cursor, resources=alert_resources) as ctx:
                    alert_cursor = alerts(ctx).cursor
                return checks

            if sink_mode == PER_RANGE:
                # Hold the consumer back: the first wave is in Kafka before the sensor's first tick.
                produce(kafka, topic_name, records[:FIRST_WAVE], partitions=PARTITION_OF)
                first = step()
                assert first["degradation_level"]["metadata"]["level"] == "GRACEFUL"
                produce(kafka, topic_name, records[FIRST_WAVE:], partitions=PARTITION_OF)
            else:
                produce(kafka, topic_name, records[:FOLLOWED], partitions=PARTITION_OF)
                result = tick(instance, defs, cursor)
                cursor = result.cursor
                levels.append(checks_of(result)["degradation_level"]["metadata"]["level"])
                assert (levels, requested_modes(result)) == (["NORMAL"], ["follow"])
                follower = execute_in_background(instance, defs, result)
                wait_for(
                    lambda: sum(committed_offsets(iceberg.trades(), topic_name).values()) == FOLLOWED,
                    timeout_s=FOLLOW_S,
                    what="the follower to commit the first trades",
                )
                produce(kafka, topic_name, records[FOLLOWED:], partitions=PARTITION_OF)
                assert follower.join(timeout_s=300) == (1, [])
                assert follower_endings(instance) == ["fell behind"]  # not "ran its time"
            second = step()
            assert second["degradation_level"]["metadata"]["level"] == "CIRCUIT_BREAK"
            assert "lag" in second["degradation_level"]["metadata"]["cause"]

            deadline = time.monotonic() + 600
            while True:
                checks = step()
                settled = (
                    checks["degradation_level"]["metadata"]["level"] == "NORMAL"
                    and checks["consumer_lag"]["metadata"]["lag_messages"] == 0
                    and checks["deferred_backlog"]["passed"]
                    and checks["spilled_backlog"]["passed"]
                )
                if settled:
                    break
                assert time.monotonic() < deadline, f"did not settle; levels so far {levels}, last checks {checks}"
                time.sleep(0.2)  # the next tick is a fresh look (the cooldown runs on the wall clock)

            print("levels per tick:", " ".join(levels))
            # Every check the sensor reports is green at the end.
            failing = {name: c for name, c in checks.items() if not c["passed"]}
            assert failing == {}

            # The level check went WARN, then ERROR, then passed (history from the instance, oldest first).
            history = list(
                reversed(instance.event_log_storage.get_asset_check_execution_history(LEVEL_CHECK, limit=10_000))
            )
            verdicts = [("PASS" if r.evaluation.passed else r.evaluation.severity.value) for r in history]
            first_error = verdicts.index("ERROR")
            if sink_mode == PER_RANGE:
                assert verdicts.index("WARN") < first_error
            else:
                assert verdicts[:first_error] == ["PASS"]  # from NORMAL under the follower straight to ERROR
            assert "PASS" in verdicts[first_error:] and verdicts[-1] == "PASS"
            assert {"AGGRESSIVE", "SOFT"} <= set(levels)  # it stepped down through the levels

        # The webhook got the alert (and its escalation) and the recovery, in that order.
        statuses = [(a["check"], a["status"], a["severity"]) for a in webhook.received]
        first_alert = "WARN" if sink_mode == PER_RANGE else "ERROR"
        assert statuses[0] == ("binance_trades:degradation_level", "firing", first_alert)
        assert ("binance_trades:degradation_level", "firing", "ERROR") in statuses
        assert statuses[-1][:2] == ("binance_trades:degradation_level", "resolved")
    finally:
        webhook.close()

    # Iceberg holds every trade exactly once.
    table = iceberg.trades()
    ids = table.scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist()
    assert len(ids) == len(records) == BURST
    assert set(ids) == {r["message_id"] for r in records}
    ends = {partition: end for partition, end in kafka.end_offsets(topic_name).items() if end}
    assert committed_offsets(table, topic_name) == ends
    assert pending_ranges(table, topic_name) == []
    assert SpillStore().list(topic_name) == []

    # Both load-shedding paths ran and were recovered (the snapshot summaries say so).
    summaries = [s.summary.additional_properties for s in table.snapshots()]
    pending_seen = [json.loads(s[pending_key(topic_name)]) for s in summaries if pending_key(topic_name) in s]
    kinds = {entry["kind"] for entries in pending_seen for entry in entries}
    if sink_mode == PER_RANGE:
        assert kinds == {"deferred", "spilled"}
    else:  # the burst met the follower at NORMAL: from CIRCUIT_BREAK down, spilled (deferred only if lag was left)
        assert "spilled" in kinds
    recovered = [s for s in summaries if "k2.kafka.recovered-kind" in s]
    assert {s["k2.kafka.recovered-kind"] for s in recovered} == kinds

    # Re-running a recovered range writes nothing.
    partition, _, offsets = recovered[0]["k2.kafka.recovered-range"].partition(":")
    start, end = (int(v) for v in offsets.split("-"))
    before = table.current_snapshot().snapshot_id
    again = recover_range(kafka, iceberg, OffsetRange(topic_name, int(partition), start, end))
    assert again.already_committed and again.written == 0
    assert iceberg.trades().current_snapshot().snapshot_id == before


def test_hybrid_query_reads_deferred_and_spilled_ranges_from_kafka_until_recovered(k2_home, kafka_broker, topic_name):
    from k2_resources.degradation.levels import DegradationLevel
    from k2_resources.degradation.shedding import LoadShedder
    from k2_resources.sink.microbatch import run_microbatch
    from k2_resources.trades.hybrid import HybridQueryResource

    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=1)
    records = recorded_trades_of("BTCUSDT", 300) + recorded_trades_of("ETHUSDT", 200)
    records.sort(key=lambda r: (r["timestamp"], r["symbol"], r["source_sequence"]))
    produce(kafka, topic_name, records, partitions=1)
    shedder, spill = LoadShedder(tier1=["BTCUSDT"], tier2=[]), SpillStore()
    graceful = run_microbatch(
        kafka,
        iceberg,
        OffsetRange(topic_name, 0, 0, 250),
        level=DegradationLevel.GRACEFUL,
        shedder=shedder,
        spill_store=spill,
    )
    spilled = run_microbatch(
        kafka,
        iceberg,
        OffsetRange(topic_name, 0, 250, 400),
        level=DegradationLevel.AGGRESSIVE,
        shedder=shedder,
        spill_store=spill,
    )
    # From the source: one partition keeps the produced order, so offsets 0..249 are records[:250].
    eth_of_graceful = [r["message_id"] for r in records[:250] if r["symbol"] == "ETHUSDT"]
    btc_of_graceful = {r["message_id"] for r in records[:250] if r["symbol"] == "BTCUSDT"}
    assert graceful.deferred == len(eth_of_graceful) > 0 and spilled.spilled == 150
    assert committed_offsets(iceberg.trades(), topic_name) == {0: 400}
    in_table = iceberg.trades().scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist()
    # the deferred ETHUSDT rows and the spilled batch are not in the table: exactly the BTCUSDT rows of 0..249
    assert len(in_table) == len(set(in_table)) == 250 - len(eth_of_graceful)
    assert set(in_table) == btc_of_graceful

    hybrid = HybridQueryResource(kafka=kafka, iceberg=iceberg, topics=[topic_name])
    everything = {r["message_id"] for r in records}
    eth = {r["message_id"] for r in records if r["symbol"] == "ETHUSDT"}
    try:
        rows = hybrid.trades(None)
        assert rows.height == len(records) and set(rows["message_id"].to_list()) == everything
        assert set(hybrid.trades("ETHUSDT")["message_id"].to_list()) == eth
        for entry in pending_ranges(iceberg.trades(), topic_name):
            recover_range(kafka, iceberg, entry.range, shedder=shedder, spill_store=spill)
        assert pending_ranges(iceberg.trades(), topic_name) == []
        assert iceberg.trades().scan().to_arrow().num_rows == 400
        rows = hybrid.trades(None)
        assert rows.height == len(records) and set(rows["message_id"].to_list()) == everything
    finally:
        hybrid.close()
