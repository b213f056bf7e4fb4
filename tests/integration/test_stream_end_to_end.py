"""Server -> WebSocket client -> Kafka -> stream sensor -> micro-batches -> Iceberg, with faults.

Every trade the local Binance server sends is in Iceberg exactly once (same count, same set
of (symbol, trade id)) even when the server drops connections, repeats trades and sends
malformed frames, and a micro-batch dies half-way and is run again.
"""

from __future__ import annotations

import multiprocessing
import os

import pytest
from dagster import DagsterInstance

from k2_resources.binance.recording_server import RecordingServerThread
from k2_resources.binance.streamer import stream_to_kafka
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_sensors.binance.driver import drive
from tests.support.stream import stream_defs

pytestmark = pytest.mark.integration

TRADES = 6_000


def _die_before_commit(topic: str, k2_home: str, bootstrap: str, partition: int, end: int) -> None:
    os.environ["K2_HOME"], os.environ["K2_KAFKA_BOOTSTRAP"] = k2_home, bootstrap
    run_microbatch(
        KafkaResource(), IcebergResource(), OffsetRange(topic, partition, 0, end), before_commit=lambda: os._exit(137)
    )


def test_every_trade_the_server_sends_lands_in_iceberg_once_despite_faults(k2_home, kafka_broker, topic_name):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    with RecordingServerThread(
        speed=None, limit=TRADES, drop_after=1_500, max_drops=3, repeat_every=400, repeat_count=3, malformed_every=1_000
    ) as server:
        stats = stream_to_kafka(
            server.url,
            topic_name,
            kafka,
            dlq_topic=dead_letter_topic(topic_name),
            backoff_initial_s=0.01,
            backoff_max_s=0.1,
        )
        sent = server.stats()
    assert sent.finished and sent.drops == 3 and sent.repeated_frames > 0 and sent.malformed_frames > 0
    assert stats.dead_lettered == sent.malformed_frames
    assert sum(kafka.end_offsets(dead_letter_topic(topic_name)).values()) == sent.malformed_frames

    # A micro-batch process reads half of the fullest partition and dies before its Iceberg commit
    # (records are keyed by symbol, so which partitions hold data depends on the hash: pick one that does).
    partition, partition_end = max(kafka.end_offsets(topic_name).items(), key=lambda item: item[1])
    assert partition_end >= 2, "the fault needs a partition with data"
    process = multiprocessing.get_context("spawn").Process(
        target=_die_before_commit,
        args=(topic_name, str(k2_home), kafka_broker.bootstrap_servers, partition, partition_end // 2),
    )
    process.start()
    process.join(timeout=180)
    assert process.exitcode == 137, "the micro-batch did not die at its commit"
    assert committed_offsets(iceberg.trades(), topic_name) == {}

    with DagsterInstance.ephemeral() as instance:
        report = drive(instance, stream_defs(topic_name, max_batch=1_000), until=lambda r: r.lag == 0, timeout_s=600)
        assert report.failed_runs == 0

    rows = iceberg.trades().scan(selected_fields=("symbol", "source_sequence")).to_arrow().to_pylist()
    in_iceberg = [(row["symbol"], row["source_sequence"]) for row in rows]
    sent_ids = {(symbol, trade_id) for symbol, ids in sent.trade_ids.items() for trade_id in ids}
    assert len(in_iceberg) == len(set(in_iceberg)) == sent.unique_trades
    assert set(in_iceberg) == sent_ids
