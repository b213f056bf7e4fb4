"""TimeOrderedReader over a real Iceberg table: order, bounded slices, pacing with an injected clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import polars as pl
import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.schemas import decode_trade, encode_trade
from k2_resources.trades.time_ordered import TimeOrderedReader
from tests.support.synthetic import asx_trades

pytestmark = pytest.mark.integration

UTC = UTC


class FakeClock:
    """A clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def asx_table(k2_home):
    rows = asx_trades(scale=1)
    # Two commits, so a window is read across files of different snapshots.
    IcebergResource().trades().append(rows.slice(0, rows.num_rows // 2))
    IcebergResource().trades().append(rows.slice(rows.num_rows // 2))
    return pl.from_arrow(rows)


def test_reads_in_time_order_complete_and_in_slices(asx_table):
    start, end = datetime(2014, 3, 10, 22, 0, tzinfo=UTC), datetime(2014, 3, 11, 6, 0, tzinfo=UTC)
    reader = TimeOrderedReader(slice_length=timedelta(minutes=20))
    batches = list(reader.batches(["BHP", "RIO"], start, end))
    assert reader.progress.slices == 24  # 8 hours in 20-minute slices
    assert len(batches) > 10 and max(b.height for b in batches) < sum(b.height for b in batches) / 5
    read = pl.concat(batches)
    expected = asx_table.filter(
        pl.col("symbol").is_in(["BHP", "RIO"]) & (pl.col("timestamp") >= start) & (pl.col("timestamp") < end)
    ).sort("timestamp", "source_sequence")
    assert read["message_id"].to_list() == expected["message_id"].to_list()
    assert read["timestamp"].is_sorted()


def test_a_speed_factor_paces_by_trade_time(asx_table):
    clock = FakeClock()
    reader = TimeOrderedReader(slice_length=timedelta(hours=1), clock=clock, sleep=clock.sleep)
    start = datetime(2014, 3, 11, 23, 0, tzinfo=UTC)
    records = []
    for record in reader.records("DVN", start, start + timedelta(hours=7), speed=60.0):
        records.append((record, clock.now))
    assert len(records) > 10
    first_time, first_wall = records[0][0]["timestamp"], records[0][1]
    for record, wall in records:
        # Each trade is yielded when (its time since the first trade) / 60 has passed on the clock.
        assert wall == pytest.approx(first_wall + (record["timestamp"] - first_time).total_seconds() / 60, abs=1e-6)
    span = (records[-1][0]["timestamp"] - first_time).total_seconds()
    assert sum(clock.sleeps) == pytest.approx(span / 60)
    # The records are V2 records: they encode for a replay topic as they are.
    assert decode_trade(encode_trade(records[0][0]))["message_id"] == records[0][0]["message_id"]


def test_as_fast_as_possible_never_sleeps_and_bad_windows_are_refused(asx_table):
    clock = FakeClock()
    reader = TimeOrderedReader(clock=clock, sleep=clock.sleep)
    start = datetime(2014, 3, 9, 20, 0, tzinfo=UTC)
    count = sum(1 for _ in reader.records(["MWR"], start, start + timedelta(days=6)))
    assert count == asx_table.filter(pl.col("symbol") == "MWR").height == 11
    assert clock.sleeps == []
    with pytest.raises(K2Error, match="not after start"):
        list(reader.records("BHP", start, start))
    with pytest.raises(K2Error, match="speed"):
        list(reader.records("BHP", start, start + timedelta(hours=1), speed=0))
