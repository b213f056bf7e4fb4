"""Loss paths of the Kafka -> Iceberg sink on a real broker and a real table: retention that passed
the committed offset (loud, recorded, accepted) and records that decode but cannot be stored."""

from __future__ import annotations

import io
import json
import struct
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import fastavro
import pytest
from dagster import DagsterInstance
from kafka import TopicPartition

from k2_assets.cli import main as k2
from k2_resources import schemas
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.dead_letters import SINK, read_dead_letter
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.operations.maintenance import expire_snapshots
from k2_resources.schemas import encode_trade
from k2_resources.schemas.avro import TRADE_V2_SCHEMA_ID
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import (
    LOSS_ACKNOWLEDGED_KEY,
    LOSS_SUMMARY_KEY,
    OffsetRange,
    committed_offsets,
    retention_losses,
)
from k2_sensors.binance.driver import drive, tick
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.stream import PER_RANGE, both_sink_modes, requested_modes, stream_defs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def iceberg_trade_ids(iceberg: IcebergResource) -> list[str]:
    return iceberg.trades().scan(selected_fields=("trade_id",)).to_arrow().column("trade_id").to_pylist()


def read_topic(kafka: KafkaResource, topic: str, timeout_s: float = 60) -> list:
    """Every record of ``topic`` from its start to the end offsets read now."""
    ends = kafka.end_offsets(topic)
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in ends]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records, deadline = [], time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp.partition] for tp in partitions):
        assert time.monotonic() < deadline, f"could not read {topic} to {ends} within {timeout_s} s"
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def delete_records_below(kafka: KafkaResource, topic: str, partition: int, offset: int) -> None:
    """What retention does to a partition: every record below ``offset`` is gone; the log starts there."""
    admin = kafka.admin()
    try:
        admin.delete_records({TopicPartition(topic, partition): offset})
    finally:
        admin.close()
    starts, _ = kafka.offset_bounds(topic)
    assert starts[partition] == offset


def checks(result) -> dict:
    return {event.check_name: event for event in result.asset_events}


@pytest.fixture
def stream_topic(kafka_broker, topic_name) -> str:
    KafkaResource().ensure_topic(topic_name, partitions=3)
    return topic_name


@both_sink_modes
def test_retention_past_the_committed_offset_is_an_error_recorded_in_the_table_until_accepted(
    k2_home, kafka_broker, stream_topic, capsys, sink_mode
):
    kafka, iceberg = KafkaResource(), IcebergResource()
    trades = recorded_trades(1200)
    first = produce(kafka, stream_topic, trades[:600])  # 200 per partition
    # Ranges of 100: past the retention gap a range must reach from the log start (300), not from the
    # committed offset (200), or it would be all loss ([200, 300)); the sensor and the follower alike.
    defs = stream_defs(stream_topic, max_batch=100, sink_mode=sink_mode)
    with DagsterInstance.ephemeral() as instance:
        drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300)
        assert committed_offsets(iceberg.trades(), stream_topic) == {0: 200, 1: 200, 2: 200}

        second = produce(kafka, stream_topic, trades[600:])  # offsets 200..399 of each partition
        delete_records_below(kafka, stream_topic, 0, 300)  # partition 0 loses 200..299 before any commit

        result = tick(instance, defs, None)
        loss = checks(result)["retention_loss"]
        assert (loss.passed, loss.severity.value) == (False, "ERROR")
        assert loss.metadata["lost_messages"].value == 100
        assert json.loads(loss.metadata["lost_ranges"].value) == [
            {"partition": 0, "start": 200, "end": 300, "count": 100, "recorded": False}
        ]
        assert "partition 0: offsets [200, 300) (100 messages)" in loss.metadata["loss"].value
        assert checks(result)["offset_baseline"].passed  # not mistaken for a recreated topic
        # The stream carries on: partition 0's batch starts at the committed offset and records the skip
        # (a follower's cycle plans the same range: the snapshot checks below show it).
        if sink_mode == PER_RANGE:
            ranges = sorted(
                request.tags["k2/offset-range"]
                for request in result.run_requests
                if request.tags["k2/kafka-partition"].endswith("-0")
            )
            assert ranges == ["200-400"]
        else:
            assert requested_modes(result) == ["follow"]

        report = drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300)
        assert report.failed_runs == 0
        still = report.last_checks["retention_loss"]
        assert still["passed"] is False  # loud until an operator accepts it
        assert json.loads(still["metadata"]["lost_ranges"]) == [
            {"partition": 0, "start": 200, "end": 300, "count": 100, "recorded": True}
        ]

    # Exactly what Kafka still had is in the table: every trade but the 100 deleted ones.
    rows = first.rows + second.rows
    lost_ids = {r["trade_id"] for r in rows if r["partition"] == 0 and 200 <= r["offset"] < 300}
    assert len(lost_ids) == 100
    ids = iceberg_trade_ids(iceberg)
    assert len(ids) == len(set(ids)) == 1100
    assert set(ids) == {r["trade_id"] for r in rows} - lost_ids
    assert committed_offsets(iceberg.trades(), stream_topic) == {0: 400, 1: 400, 2: 400}

    # The snapshot that skipped the lost offsets says so, in the same commit that moved past them.
    table = iceberg.trades()
    recorded = [
        s.summary.additional_properties
        for s in table.snapshots()
        if LOSS_SUMMARY_KEY in s.summary.additional_properties
    ]
    assert len(recorded) == 1
    (entry,) = json.loads(recorded[0][LOSS_SUMMARY_KEY])
    assert (entry["partition"], entry["start"], entry["end"], entry["count"]) == (0, 200, 300, 100)
    assert (
        recorded[0]["k2.kafka.partition"],
        recorded[0]["k2.kafka.start-offset"],
        recorded[0]["k2.kafka.end-offset"],
    ) == ("0", "200", "400")
    # Re-running that range writes nothing and records nothing twice.
    again = run_microbatch(kafka, iceberg, OffsetRange(stream_topic, 0, 200, 400))
    assert again.already_committed and again.written == 0 and again.lost == 0

    # Snapshot expiry drops the snapshot; the table property keeps the loss for an audit.
    expire_snapshots(table, older_than=datetime.now(UTC) + timedelta(seconds=1), retain_last=1)
    table = iceberg.trades()
    assert len(table.snapshots()) == 1
    assert [(x.partition, x.start, x.end, x.acknowledged) for x in retention_losses(table, stream_topic)] == [
        (0, 200, 300, False)
    ]
    capsys.readouterr()
    assert k2(["offsets", "show", "--topic", stream_topic]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [
        (x["partition"], x["start"], x["end"], x["count"], x["acknowledged"]) for x in shown["retention_losses"]
    ] == [(0, 200, 300, 100, False)]
    assert shown["partitions"]["0"]["retention_gap"] == 0

    # The operator accepts it: who, when and why go into one more commit; the check turns green.
    assert (
        k2(
            [
                "offsets",
                "accept-loss",
                "--topic",
                stream_topic,
                "--by",
                "ops-on-call",
                "--note",
                "Kafka retention shorter than the outage; reloaded from the exchange",
            ]
        )
        == 0
    )
    assert "accepted by ops-on-call: partition 0: offsets [200, 300)" in capsys.readouterr().out
    table = iceberg.trades()
    acknowledgement = json.loads(table.current_snapshot().summary.additional_properties[LOSS_ACKNOWLEDGED_KEY])
    assert acknowledgement["by"] == "ops-on-call" and acknowledgement["ranges"][0]["count"] == 100
    assert retention_losses(table, stream_topic)[0].acknowledged_by == "ops-on-call"
    assert committed_offsets(table, stream_topic) == {0: 400, 1: 400, 2: 400}
    with DagsterInstance.ephemeral() as instance:
        after = checks(tick(instance, defs, None))["retention_loss"]
        assert after.passed and after.metadata["acknowledged_losses"].value == 1


def _overflowing_timestamp(record: dict) -> bytes:
    """A K2-framed trade whose timestamp-micros is far beyond year 9999: decoding it overflows."""
    schema = json.loads((Path(schemas.__file__).parent / "trade_v2.avsc").read_text())
    for entry in schema["fields"]:
        if entry["name"] == "timestamp":
            entry["type"] = "long"  # write the raw long that the logical type cannot represent
    buffer = io.BytesIO()
    buffer.write(struct.pack(">bI", 0, TRADE_V2_SCHEMA_ID))
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema), {**record, "timestamp": 2**62})
    return buffer.getvalue()


@both_sink_modes
def test_a_record_that_decodes_but_cannot_be_stored_is_a_dead_letter_and_its_batch_commits(
    k2_home, kafka_broker, topic_name, sink_mode
):
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=1)
    valid = recorded_trades(300)
    huge_price = {
        **valid[0],
        "message_id": "poison-price",
        "trade_id": "BINANCE-poison-price",
        "price": Decimal("123456789012345.5"),
    }  # Avro carries it; decimal(18,8) cannot
    poison = {
        50: encode_trade(huge_price),
        120: b"\x00\x00\x00\x00\x01 not avro at all",
        200: _overflowing_timestamp(valid[1]),
    }
    producer = kafka.producer()
    values, index = [], 0
    for position in range(len(valid) + len(poison)):
        if position in poison:
            values.append(poison[position])
        else:
            values.append(encode_trade(valid[index]))
            index += 1
    for value in values:
        producer.send(topic_name, value=value, partition=0)
    producer.flush()
    producer.close()

    defs = stream_defs(topic_name, max_batch=1000, sink_mode=sink_mode)
    with DagsterInstance.ephemeral() as instance:
        report = drive(instance, defs, until=lambda r: r.lag == 0, timeout_s=300)
        assert (report.runs, report.failed_runs) == (1, 0)  # one batch, not stalled by its poison
        # one commit (a follower adds its summary, which has no rows_written)
        (materialization,) = [
            r.asset_materialization
            for r in instance.fetch_materializations(defs.resolve_assets_def("binance_trades").key, limit=5).records
            if r.asset_materialization is not None and "rows_written" in r.asset_materialization.metadata
        ]
        metadata = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        assert (metadata["rows_written"], metadata["dead_lettered"]) == (300, 3)

    ids = iceberg_trade_ids(iceberg)
    assert len(ids) == len(set(ids)) == 300
    assert set(ids) == {r["trade_id"] for r in valid}
    assert committed_offsets(iceberg.trades(), topic_name) == {0: 303}

    letters = [read_dead_letter(m.value, m.headers) for m in read_topic(kafka, dead_letter_topic(topic_name))]
    assert len(letters) == 3
    by_source = {letter.source: letter for letter in letters}
    assert set(by_source) == {f"{topic_name}/0@{offset}" for offset in poison}
    for offset, raw in poison.items():
        letter = by_source[f"{topic_name}/0@{offset}"]
        assert letter.raw == raw  # the message exactly as it was in Kafka
        assert (letter.stage, letter.source_topic, letter.source_partition, letter.source_offset) == (
            SINK,
            topic_name,
            0,
            offset,
        )
        expected = "unstorable" if offset == 50 else "undecodable"
        assert letter.reason == expected and letter.detail.startswith(expected), letter
    assert "OverflowError" in by_source[f"{topic_name}/0@200"].detail
