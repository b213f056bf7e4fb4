"""Kafka retention deletes offsets a commit still needed, on the two paths that were never tried:
``recover_range`` of a range deferred under GRACEFUL, and a follower's commit (``follow_topic``).
Both must write what Kafka still has, exactly once, and record the deleted offsets as a retention
loss in the same commit (snapshot summary and the table's loss history), never skip them silently.
Real broker (records deleted with DeleteRecords, as retention does), real Iceberg table."""

from __future__ import annotations

import json

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.follow import ROTATED, FollowSettings, follow_topic
from k2_resources.sink.microbatch import recover_range, run_microbatch
from k2_resources.sink.offsets import (
    LOSS_SUMMARY_KEY,
    OffsetRange,
    committed_offsets,
    pending_ranges,
    retention_losses,
)
from tests.support.sink_losses import delete_records_below, ids_where, message_ids, produce_trades

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

KEPT, DEFERRED = "BTCUSDT", "QQQUSDT"  # tier 1 and tier 3 of the default tiers


def _loss_snapshots(iceberg: IcebergResource) -> list[dict]:
    summaries = [s.summary.additional_properties for s in iceberg.trades().snapshots() if s.summary is not None]
    return [dict(summary) for summary in summaries if LOSS_SUMMARY_KEY in summary]


def test_retention_loss_inside_recover_range_is_recorded_in_the_recovery_commit(
    k2_home, kafka_broker, topic_name
) -> None:
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=1)
    produced = produce_trades(kafka, topic_name, [KEPT, DEFERRED] * 50)  # offsets 0..99
    batch = OffsetRange(topic_name, 0, 0, 100)
    first = run_microbatch(kafka, iceberg, batch, level=DegradationLevel.GRACEFUL)
    assert (first.written, first.deferred) == (50, 50)
    [pending] = pending_ranges(iceberg.trades(), topic_name)
    assert (pending.kind, pending.symbols) == ("deferred", (DEFERRED,))

    delete_records_below(kafka, topic_name, 0, 40)  # retention passes while the range waits for recovery
    recovered = recover_range(kafka, iceberg, batch)
    assert (recovered.written, recovered.lost) == (30, 40)

    # What Kafka still had is in the table, once; the deferred trades at offsets 0..39 are gone.
    ids = message_ids(iceberg)
    assert len(ids) == len(set(ids))
    assert set(ids) == ids_where(produced, lambda r: r["symbol"] == KEPT or r["offset"] >= 40)
    table = iceberg.trades()
    assert pending_ranges(table, topic_name) == [] and committed_offsets(table, topic_name) == {0: 100}
    # ... and the loss is recorded in the recovery's own commit and in the table's history.
    assert [(x.partition, x.start, x.end, x.acknowledged) for x in retention_losses(table, topic_name)] == [
        (0, 0, 40, False)
    ]
    [summary] = _loss_snapshots(iceberg)
    assert summary["k2.kafka.recovered-range"] == "0:0-100"
    assert [(x["start"], x["end"]) for x in json.loads(summary[LOSS_SUMMARY_KEY])] == [(0, 40)]
    # Recovering again writes nothing and records nothing twice.
    again = recover_range(kafka, iceberg, batch)
    assert again.already_committed and again.written == 0 and again.lost == 0
    assert len(retention_losses(iceberg.trades(), topic_name)) == 1 and len(_loss_snapshots(iceberg)) == 1


def test_retention_loss_in_a_follower_commit_is_recorded_and_the_rest_written_once(
    k2_home, kafka_broker, topic_name
) -> None:
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=1)
    results: list = []
    settings = FollowSettings(interval_s=0.1, run_for_s=0.0)  # one cycle, then it hands back
    first = produce_trades(kafka, topic_name, [KEPT] * 100)
    outcome = follow_topic(kafka, iceberg, topic_name, settings, results.append)
    assert (outcome.reason, outcome.commits, outcome.rows_written) == (ROTATED, 1, 100)

    second = produce_trades(kafka, topic_name, [KEPT] * 100, first_index=100)  # offsets 100..199
    delete_records_below(kafka, topic_name, 0, 150)  # 100..149 gone before the follower read them
    outcome = follow_topic(kafka, iceberg, topic_name, settings, results.append)
    assert (outcome.commits, outcome.rows_written, outcome.ranges) == (1, 50, [f"{topic_name}-0-100-200"])
    assert results[-1].lost == 50

    ids = message_ids(iceberg)
    assert len(ids) == len(set(ids)) == 150
    assert set(ids) == ids_where(first, lambda r: True) | ids_where(second, lambda r: r["offset"] >= 150)
    table = iceberg.trades()
    assert committed_offsets(table, topic_name) == {0: 200}
    assert [(x.partition, x.start, x.end) for x in retention_losses(table, topic_name)] == [(0, 100, 150)]
    [summary] = _loss_snapshots(iceberg)  # recorded in the commit that moved past the lost offsets
    assert (summary["k2.kafka.start-offset"], summary["k2.kafka.end-offset"]) == ("100", "200")
