"""Micro-batches of different partitions committing at the same time keep every partition's offsets.

Each K2 commit records the committed offsets of all partitions of the topic. pyiceberg 0.12
retries a conflicting commit on its own, re-basing the data but keeping the properties computed
before the conflict, which erased the other partition's offset (seen with two sink processes in
the parallel-partition benchmark). K2 turns that retry off and retries from a fresh table itself.
Real Iceberg (SQLite catalog, file warehouse); writers race with one catalog each, like processes.
The race is forced, not hoped for: both writers plan each commit from the same snapshot (a barrier
just before the first attempt's commit), so one of them must lose every round, and the test counts
the commit layer's conflicts to prove it.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from k2_resources.catalog.commit import COMMIT_RETRIES_PROPERTY
from k2_resources.catalog.resource import IcebergResource
from k2_resources.sink.offset_commit import commit_range
from k2_resources.sink.offsets import OffsetRange, committed_offsets

TOPIC = "market.trades.binance"
RANGES = 8
SIZE = 40


def rows(partition: int, start: int) -> list[dict]:
    moment = datetime(2024, 8, 9, tzinfo=UTC)
    return [
        {
            "message_id": f"m{partition}-{offset}",
            "trade_id": f"BINANCE-{partition}-{offset}",
            "symbol": ("BTCUSDT", "ETHUSDT")[partition],
            "exchange": "BINANCE",
            "asset_class": "crypto",
            "timestamp": moment + timedelta(milliseconds=offset),
            "price": Decimal("61000.5"),
            "quantity": Decimal("0.001"),
            "currency": "USDT",
            "side": "BUY",
            "trade_conditions": [],
            "source_sequence": offset,
            "ingestion_timestamp": moment,
            "platform_sequence": offset,
            "vendor_data": None,
        }
        for offset in range(start, start + SIZE)
    ]


@pytest.mark.timeout(300)
def test_two_partitions_committing_at_once_lose_no_offsets_and_write_no_duplicates(k2_home, caplog):
    IcebergResource().trades()  # the table exists before the writers start
    planned = threading.Barrier(2)
    failures: list[BaseException] = []

    def write(partition: int) -> None:
        iceberg = IcebergResource()  # a catalog of its own, as another process would have
        try:
            for index in range(RANGES):
                first_attempt = [True]

                def both_planned(first: list[bool] = first_attempt) -> None:
                    # Both writers loaded the table and planned their commit before either commits:
                    # the second to commit is based on a snapshot that is no longer current.
                    if first[0]:
                        first[0] = False
                        planned.wait(timeout=60)

                start = index * SIZE
                commit_range(
                    iceberg,
                    OffsetRange(TOPIC, partition, start, start + SIZE),
                    rows(partition, start),
                    before_commit=both_planned,
                )
        except BaseException as exc:
            failures.append(exc)
            planned.abort()

    writers = [threading.Thread(target=write, args=(p,)) for p in (0, 1)]
    with caplog.at_level(logging.INFO, logger="k2_resources.catalog.commit"):
        for writer in writers:
            writer.start()
        for writer in writers:
            writer.join(timeout=240)
    assert not failures, failures
    conflicts = [r for r in caplog.records if "conflicted" in r.getMessage()]
    assert len(conflicts) >= RANGES, "the commits never raced, so the test proved nothing"

    table = IcebergResource().trades()
    assert table.properties[COMMIT_RETRIES_PROPERTY] == "0"
    assert committed_offsets(table, TOPIC) == {0: RANGES * SIZE, 1: RANGES * SIZE}
    ids = table.scan(selected_fields=("message_id",)).to_arrow().column("message_id").to_pylist()
    assert len(ids) == len(set(ids)) == 2 * RANGES * SIZE
