"""Exact hybrid reads: trades split between Iceberg and the Kafka tail at known offsets."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.schemas import encode_trade
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import (
    OffsetRange,
    committed_offsets,
    snapshot_committed_offsets,
)
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support.producing import PARTITIONS, Produced, produce
from tests.support.recorded import recorded_trades_in_time_order

pytestmark = pytest.mark.integration


@pytest.fixture
def split(k2_home, kafka_broker, topic_name):
    """3000 real trades in Kafka; the first half of each partition committed to Iceberg in two batches."""
    kafka, iceberg = KafkaResource(), IcebergResource()
    # Messages carry the trades' own 2024 times: keep them regardless of age.
    kafka.ensure_topic(topic_name, partitions=PARTITIONS, config={"retention.ms": "-1"})
    source = produce(kafka, topic_name, recorded_trades_in_time_order(), record_timestamps=True)
    ends = kafka.end_offsets(topic_name)
    boundary = {p: end // 2 for p, end in ends.items()}
    for partition, offset in boundary.items():
        run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, 0, offset // 2))
        run_microbatch(kafka, iceberg, OffsetRange(topic_name, partition, offset // 2, offset))
    assert committed_offsets(iceberg.trades(), topic_name) == boundary
    # A small clock slack, so that offsets_for_times visibly bounds the short recorded window.
    hybrid = HybridQueryResource(topics=[topic_name], producer_clock_slack_seconds=1)
    yield source, hybrid, boundary, ends
    hybrid.close()


def _ids(frame) -> list[str]:
    return frame["message_id"].to_list()


def _boundary_time(source: Produced, boundary: dict[int, int]) -> tuple[datetime, datetime]:
    """(last committed trade time, first uncommitted trade time)."""
    committed = [r["timestamp"] for r in source.rows if r["offset"] < boundary[r["partition"]]]
    tail = [r["timestamp"] for r in source.rows if r["offset"] >= boundary[r["partition"]]]
    return max(committed), min(tail)


def test_windows_in_iceberg_in_kafka_and_across_the_boundary(split):
    source, hybrid, boundary, ends = split
    last_committed, first_tail = _boundary_time(source, boundary)
    first = source.rows[0]["timestamp"]
    last = source.rows[-1]["timestamp"]
    windows = {
        "iceberg": (first, last_committed - timedelta(seconds=5)),
        "kafka": (first_tail + timedelta(seconds=5), last + timedelta(seconds=1)),
        "across": (last_committed - timedelta(seconds=20), first_tail + timedelta(seconds=20)),
        "everything": (None, None),
    }
    for name, (start, end) in windows.items():
        for symbols in (["BTCUSDT"], ["BTCUSDT", "ETHUSDT"]):
            frame = hybrid.trades(symbols, start, end)
            expected = source.expected(symbols, start, end)
            assert expected, f"window {name} selects no source trade: the test data is wrong"
            assert _ids(frame) == expected, f"window {name}, symbols {symbols}"
            assert frame["message_id"].n_unique() == frame.height
            stats = hybrid.last_stats
            if name == "iceberg":
                assert stats.kafka_rows == 0 and stats.iceberg_rows == len(expected)
            if name == "kafka":
                assert stats.iceberg_rows == 0 and stats.kafka_rows == len(expected)
            if name in ("across", "everything"):
                assert stats.iceberg_rows > 0 and stats.kafka_rows > 0

    # With nothing cached yet, offsets_for_times bounds the Kafka read: it starts past the committed offsets.
    fresh = HybridQueryResource(topics=hybrid.topics, producer_clock_slack_seconds=1)
    start, end = windows["kafka"]
    assert _ids(fresh.trades(["ETHUSDT"], start, end)) == source.expected(["ETHUSDT"], start, end)
    ranges = fresh.last_stats.kafka.ranges
    assert all(ranges[(hybrid.topics[0], p)][0] > boundary[p] for p in boundary)
    assert fresh.last_stats.kafka.fetched_messages < sum(ends[p] - boundary[p] for p in boundary)
    fresh.close()


def test_a_batch_committing_during_the_query_counts_nothing_twice(split):
    source, hybrid, boundary, ends = split
    topic = hybrid.topics[0]
    kafka, iceberg = KafkaResource(), IcebergResource()
    next_end = {p: boundary[p] + (ends[p] - boundary[p]) // 2 for p in boundary}

    def commit_next_batches() -> None:
        for partition in boundary:
            run_microbatch(kafka, iceberg, OffsetRange(topic, partition, boundary[partition], next_end[partition]))

    hybrid._after_metadata_read = commit_next_batches
    frame = hybrid.trades(["BTCUSDT", "ETHUSDT"])
    hybrid._after_metadata_read = None
    assert committed_offsets(iceberg.trades(), topic) == next_end  # the batch really committed mid-query
    assert _ids(frame) == source.expected(None, None, None)
    # The query read the snapshot from before that commit, and the moved offsets from Kafka.
    assert hybrid.last_stats.committed[topic] == boundary
    assert hybrid.last_stats.duplicates_dropped == 0

    after = hybrid.trades(["BTCUSDT", "ETHUSDT"])
    assert _ids(after) == source.expected(None, None, None)
    assert hybrid.last_stats.committed[topic] == next_end
    assert hybrid.last_stats.iceberg_rows == sum(next_end.values())


def test_concurrent_micro_batches_while_querying_in_a_loop(split):
    source, hybrid, boundary, ends = split
    topic = hybrid.topics[0]
    kafka, iceberg = KafkaResource(), IcebergResource()
    expected = source.expected(["BTCUSDT"], None, None)
    errors: list[BaseException] = []

    def committer() -> None:
        try:
            for partition in boundary:
                position = boundary[partition]
                while position < ends[partition]:
                    step = min(97, ends[partition] - position)
                    run_microbatch(kafka, iceberg, OffsetRange(topic, partition, position, position + step))
                    position += step
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=committer)
    thread.start()
    queries = 0
    seen_committed = set()
    while thread.is_alive() or queries < 3:
        frame = hybrid.trades(["BTCUSDT"])
        assert _ids(frame) == expected
        seen_committed.add(tuple(sorted(hybrid.last_stats.committed[topic].items())))
        queries += 1
    thread.join()
    assert not errors, errors
    assert committed_offsets(iceberg.trades(), topic) == ends
    assert len(seen_committed) >= 2  # the queries really ran against different commits


def test_as_of_reads_time_travel_only(split):
    source, hybrid, boundary, ends = split
    table = IcebergResource().trades()
    snapshots = sorted(table.snapshots(), key=lambda s: s.sequence_number)
    first_batch = snapshots[0]  # one partition's first half-batch
    held = snapshot_committed_offsets(table, first_batch, hybrid.topics[0])
    assert len(held) == 1 and sum(held.values()) > 0
    frame = hybrid.trades(None, as_of=first_batch.snapshot_id)
    assert _ids(frame) == source.expected(None, None, None, below=held)
    assert hybrid.last_stats.kafka_rows == 0

    at_time = datetime.fromtimestamp(snapshots[-1].timestamp_ms / 1000, tz=UTC)
    everything_committed = hybrid.trades(["ETHUSDT"], as_of=at_time)
    assert _ids(everything_committed) == source.expected(["ETHUSDT"], None, None, below=boundary)

    with pytest.raises(K2Error, match="no snapshot"):
        hybrid.trades(None, as_of=123456789)


def test_recent_trades_with_an_explicit_now_and_duplicates_dropped(split):
    source, hybrid, boundary, ends = split
    last = source.rows[-1]["timestamp"]
    frame = hybrid.recent_trades("ETHUSDT", minutes=2, now=last)
    assert _ids(frame) == source.expected(["ETHUSDT"], last - timedelta(minutes=2), last + timedelta(microseconds=1))

    # The same trade delivered again (an upstream re-send) appears once.
    again = next(r for r in source.rows if r["symbol"] == "ETHUSDT" and r["offset"] < boundary[r["partition"]])
    record = {k: v for k, v in again.items() if k not in ("partition", "offset")}
    producer = KafkaResource().producer()
    producer.send(hybrid.topics[0], key=b"ETHUSDT", value=encode_trade(record), partition=0).get(timeout=30)
    producer.close()
    frame = hybrid.trades_arrow("ETHUSDT")
    assert frame.column("message_id").to_pylist() == source.expected(["ETHUSDT"], None, None)
    assert hybrid.last_stats.duplicates_dropped == 1


def test_k2_query_trades_prints_the_hybrid_result(split, capsys):
    from k2_assets.cli import main

    source, hybrid, boundary, ends = split
    last = source.rows[-1]["timestamp"]
    code = main(
        [
            "query",
            "trades",
            "--symbol",
            "BTCUSDT",
            "--topic",
            hybrid.topics[0],
            "--columns",
            "message_id",
            "--format",
            "csv",
            "--minutes",
            "1",
            "--end",
            last.isoformat(),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "message_id"
    assert printed[1:] == source.expected(["BTCUSDT"], last - timedelta(minutes=1), last)

    assert main(["query", "trades", "--symbol", "BTCUSDT", "--columns", "nope", "--topic", hybrid.topics[0]]) == 2
    assert "unknown column(s) nope" in capsys.readouterr().err


def test_quotes_come_from_iceberg_in_time_order_with_time_travel(k2_home):
    from k2_resources.catalog.resource import to_arrow
    from k2_resources.catalog.tables import QUOTES

    iceberg = IcebergResource()
    base = datetime(2014, 3, 11, 0, 0, tzinfo=UTC)

    def quote(n: int, symbol: str, seconds: int) -> dict:
        return {
            "message_id": f"Q-{n}",
            "quote_id": f"ASX-Q{n}",
            "symbol": symbol,
            "exchange": "ASX",
            "asset_class": "equities",
            "timestamp": base + timedelta(seconds=seconds),
            "bid_price": Decimal("36.5") + n,
            "bid_quantity": Decimal(100),
            "ask_price": Decimal("36.6") + n,
            "ask_quantity": Decimal(200),
            "currency": "AUD",
            "source_sequence": n,
            "ingestion_timestamp": datetime.now(UTC),
            "platform_sequence": None,
            "vendor_data": None,
        }

    iceberg.quotes().append(to_arrow([quote(1, "BHP", 30), quote(2, "RIO", 10), quote(3, "BHP", 5)], QUOTES))
    first = iceberg.quotes().current_snapshot().snapshot_id
    iceberg.quotes().append(to_arrow([quote(4, "BHP", 20)], QUOTES))

    hybrid = HybridQueryResource(topics=[])
    frame = hybrid.quotes("BHP")
    assert frame["message_id"].to_list() == ["Q-3", "Q-4", "Q-1"]
    assert hybrid.quotes("BHP", as_of=first)["message_id"].to_list() == ["Q-3", "Q-1"]
    window = hybrid.quotes_arrow(["BHP", "RIO"], base + timedelta(seconds=10), base + timedelta(seconds=30))
    assert window.column("message_id").to_pylist() == ["Q-2", "Q-4"]
    assert window.schema == QUOTES.arrow_schema()
