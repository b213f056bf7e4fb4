"""A range spilled under AGGRESSIVE whose spill file is gone by the time it is recovered (a wiped
K2_HOME/spill, a lost disk): ``recover_range`` reads it again from Kafka and writes it exactly once;
where Kafka retention has also deleted part of it, that part is recorded as a retention loss.
Real broker, real Iceberg table, real spill files."""

from __future__ import annotations

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.degradation.spill import SpillStore
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.microbatch import recover_range, run_microbatch
from k2_resources.sink.offsets import OffsetRange, committed_offsets, pending_ranges, retention_losses
from tests.support.sink_losses import delete_records_below, ids_where, message_ids, produce_trades

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_a_spilled_range_whose_file_is_gone_is_recovered_from_kafka_exactly_once(
    k2_home, kafka_broker, topic_name
) -> None:
    kafka, iceberg, spill = KafkaResource(), IcebergResource(), SpillStore()
    kafka.ensure_topic(topic_name, partitions=2)
    produced = produce_trades(kafka, topic_name, ["BTCUSDT", "QQQUSDT", "ETHUSDT"] * 40, partitions=2)
    batches = [OffsetRange(topic_name, p, 0, 60) for p in (0, 1)]
    for batch in batches:
        spilled = run_microbatch(kafka, iceberg, batch, level=DegradationLevel.AGGRESSIVE, spill_store=spill)
        assert (spilled.written, spilled.spilled) == (0, 60)
    assert message_ids(iceberg) == [] and len(pending_ranges(iceberg.trades(), topic_name)) == 2

    files = [f for p in (0, 1) for f in spill.list(topic_name, p)]
    assert len(files) == 2
    for spilled_file in files:
        spilled_file.path.unlink()  # the spill folder is lost before recovery
    assert not any(spill.list(topic_name, p) for p in (0, 1))
    delete_records_below(kafka, topic_name, 1, 10)  # partition 1 has lost its first 10 offsets to retention

    results = [recover_range(kafka, iceberg, batch, spill_store=spill) for batch in batches]
    assert [(r.written, r.lost) for r in results] == [(60, 0), (50, 10)]

    ids = message_ids(iceberg)
    assert len(ids) == len(set(ids)) == 110
    assert set(ids) == ids_where(produced, lambda r: r["partition"] == 0 or r["offset"] >= 10)
    table = iceberg.trades()
    assert pending_ranges(table, topic_name) == []
    assert committed_offsets(table, topic_name) == {0: 60, 1: 60}
    assert [(x.partition, x.start, x.end) for x in retention_losses(table, topic_name)] == [(1, 0, 10)]
    # Recovering again writes nothing.
    again = [recover_range(kafka, iceberg, batch, spill_store=spill) for batch in batches]
    assert all(r.already_committed and r.written == 0 for r in again)
    assert len(message_ids(iceberg)) == 110
