"""A micro-batch commit that conflicts with another partition's commit retries the metadata
commit only: its Parquet file is written once (rewriting it on every retry is what kept two
partitions' sinks from running in parallel), and the retry is still exactly once.
Real Iceberg (SQLite catalog, file warehouse)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.sink.offset_commit import commit_range
from k2_resources.sink.offsets import OffsetRange, committed_offsets

TOPIC = "market.trades.binance"
SIZE = 30


def rows(partition: int) -> list[dict]:
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
        for offset in range(SIZE)
    ]


@pytest.mark.timeout(300)
def test_a_conflicting_commit_retries_with_the_file_it_already_wrote(k2_home):
    iceberg, other = IcebergResource(), IcebergResource()  # two catalogs, as two processes have
    iceberg.trades()
    attempts = []

    def partition_1_commits_first() -> None:  # runs before each commit attempt of partition 0
        attempts.append(len(attempts) + 1)
        if len(attempts) == 1:  # after partition 0 loaded the table: its first attempt must conflict
            commit_range(other, OffsetRange(TOPIC, 1, 0, SIZE), rows(1))

    result = commit_range(iceberg, OffsetRange(TOPIC, 0, 0, SIZE), rows(0), before_commit=partition_1_commits_first)
    assert attempts == [1, 2] and not result.already_committed and result.written == SIZE

    table = iceberg.trades()
    assert committed_offsets(table, TOPIC) == {0: SIZE, 1: SIZE}
    assert table.scan().count() == 2 * SIZE
    referenced = {task.file.file_path.removeprefix("file://") for task in table.scan().plan_files()}
    on_disk = {str(path) for path in k2_home.rglob("*.parquet")}
    assert len(referenced) == 2 and on_disk == referenced  # no file left behind by the retry
