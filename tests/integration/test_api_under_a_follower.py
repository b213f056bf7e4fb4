"""The API while a follower commits every fraction of a second and maintenance compacts beside it.

Queries then mostly read a version of market.trades that is no longer the newest (the newest is
prepared aside, k2_resources.trades.serving_table) with the Kafka tail above that version's committed
offsets. Every answer must hold each trade Kafka acknowledged before the request was sent, none twice
and none that was never sent, and once the follower has caught up the answer is every trade in order.
"""

from __future__ import annotations

import os
import threading
from collections import Counter

import httpx
import pytest

from k2_resources.api.app import ApiSettings, create_app
from k2_resources.api.keys import KeyFile, KeyStore
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import TRADES
from k2_resources.kafka.resource import KafkaResource
from k2_resources.operations.continuous_maintenance import ContinuousMaintenance, MaintenanceSettings
from k2_resources.operations.settled_compaction import CompactionSettings
from k2_resources.operations.snapshot_policy import SnapshotPolicy
from k2_resources.platform.kafka_broker import free_port
from k2_resources.sink.follow import FollowSettings, follow_topic
from k2_resources.sink.offsets import committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support.api_server import serving
from tests.support.producing import PARTITIONS, produce
from tests.support.recorded import recorded_trades_in_time_order
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

WAVES = 12
QUERIES_PER_WAVE = 6
MAINTENANCE = MaintenanceSettings(
    interval_s=1.0,
    compaction=CompactionSettings(settle_window_s=1, min_files=3),
    snapshots=SnapshotPolicy(exact_window_s=30, max_exact_snapshots=500, hourly_for_s=3600, retention_s=3600),
    orphan_interval_s=30,
    orphan_grace_s=30,
)


def test_every_answer_holds_each_acknowledged_trade_once_while_the_table_changes_under_it(k2_home, kafka_broker):
    topic = f"test-api-follower-{os.getpid()}-{free_port()}"
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic, partitions=PARTITIONS, config={"retention.ms": "-1"})
    records = recorded_trades_in_time_order(900)
    waves = [records[index::WAVES] for index in range(WAVES)]
    keys = KeyFile(k2_home / "api" / "keys.json")
    key, _ = keys.create("reader", ["read:trades"])
    settings = ApiSettings(keys_file=str(keys.path), rate_per_second=10_000, burst=10_000, topics=[topic])
    app = create_app(settings, hybrid=HybridQueryResource(topics=[topic]), keys=KeyStore(keys.path))
    stop = threading.Event()
    maintenance = ContinuousMaintenance(iceberg, MAINTENANCE, tables=(TRADES,))
    errors: list[BaseException] = []

    def follow() -> None:
        try:
            while not stop.is_set():
                follow_topic(
                    kafka,
                    iceberg,
                    topic,
                    FollowSettings(interval_s=0.2, run_for_s=600, memory_limit_percent=100.0),
                    lambda result: None,
                    should_stop=stop.is_set,
                    pause=maintenance.window.pause,
                )
        except BaseException as exc:  # raised in the test below
            errors.append(exc)

    acknowledged: set[str] = set()
    answers = 0
    with maintenance, serving(app) as base_url, httpx.Client(base_url=base_url, timeout=120) as client:
        follower = threading.Thread(target=follow, name="test-follower", daemon=True)
        follower.start()

        def answer() -> list[str]:
            response = client.get(
                "/v1/trades",
                params={"symbol": ["BTCUSDT", "ETHUSDT"], "limit": 50_000},
                headers={"X-API-Key": key},
            )
            assert response.status_code == 200, response.text
            return [row["message_id"] for row in response.json()["data"]]

        try:
            for wave in waves:
                produce(kafka, topic, wave, record_timestamps=True)  # returns once Kafka acknowledged each
                acknowledged |= {r["message_id"] for r in wave}
                for _ in range(QUERIES_PER_WAVE):
                    ids = answer()
                    answers += 1
                    twice = [i for i, n in Counter(ids).items() if n > 1]
                    assert not twice, f"answer {answers}: {len(twice)} trades twice, e.g. {twice[:3]}"
                    assert acknowledged <= set(ids), f"answer {answers}: {len(acknowledged - set(ids))} missing"
                    assert set(ids) <= {r["message_id"] for r in records}
            ends = kafka.end_offsets(topic)
            wait_for(
                lambda: committed_offsets(iceberg.trades(), topic) == ends or bool(errors),
                timeout_s=120,
                what=f"the follower to commit {topic} up to {ends}",
            )
            wait_for(
                lambda: sum(p.compaction.commits for p in maintenance.passes if p.compaction) >= 1,
                timeout_s=120,
                what="a compaction beside the follower",
            )
            in_order = sorted(records, key=lambda r: (r["timestamp"], r["message_id"]))
            assert answer() == [r["message_id"] for r in in_order]
        finally:
            stop.set()
            follower.join(timeout=120)
        served = app.state.k2.serving.served
    assert not errors, errors
    # the path under test was taken: versions prepared aside while queries read the one before
    assert served.prepared_aside >= 1, (served.prepared_aside, served.served_at_once)
    print(f"{answers} answers; versions prepared aside {served.prepared_aside}, served at once {served.served_at_once}")
