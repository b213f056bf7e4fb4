"""The hybrid resource answers what it can without Kafka, and fails fast (or partially, when asked) otherwise.

Real trades go through a real broker into a real Iceberg table (half of each partition committed);
then the reads point at a closed port, or the broker is stopped under a resource that already has a
consumer: what a notebook user meets when Kafka goes down.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import polars as pl
import pytest

from k2_assets.cli import main
from k2_resources.catalog.resource import IcebergResource, to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.errors import KafkaUnavailableError
from k2_resources.kafka.resource import KafkaResource
from k2_resources.paths import DATA_DIR
from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from k2_resources.trades.hybrid import HybridQueryResource, KafkaTailMissingWarning
from tests.support.producing import Produced, produce
from tests.support.recorded import recorded_trades_in_time_order
from tests.support.tail_calls import record_tail_calls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ASX_START = datetime(2014, 3, 9, tzinfo=UTC)  # 10 March in Sydney starts on the 9th in UTC
ASX_END = datetime(2014, 3, 15, tzinfo=UTC)


def _commit_half(kafka: KafkaResource, iceberg: IcebergResource, topic: str) -> tuple[Produced, dict[int, int]]:
    """Real recorded Binance trades in ``topic``; the first half of each partition committed to Iceberg."""
    kafka.ensure_topic(topic, partitions=3, config={"retention.ms": "-1"})
    source = produce(kafka, topic, recorded_trades_in_time_order(per_symbol=600))
    boundary = {p: end // 2 for p, end in kafka.end_offsets(topic).items()}
    for partition, offset in boundary.items():
        run_microbatch(kafka, iceberg, OffsetRange(topic, partition, 0, offset))
    return source, boundary


def _load_bhp(iceberg: IcebergResource) -> int:
    """The first 2000 real ASX trades of BHP (company 7078, 10 March 2014) appended to market.trades; returns
    their count."""
    raw = pl.read_csv(
        DATA_DIR / "asx" / "trades" / "7078.csv",
        has_header=False,
        new_columns=["date", "time", "price", "volume", "code", "venue", "buyer"],
        schema_overrides={"date": pl.String, "time": pl.String, "price": pl.String, "volume": pl.String},
    )
    sydney = ZoneInfo("Australia/Sydney")
    ingested = datetime.now(UTC)
    records = [
        {
            "message_id": f"ASX-7078-{n}",
            "trade_id": f"ASX-7078-{n}",
            "symbol": "BHP",
            "exchange": "ASX",
            "asset_class": "equities",
            "price": Decimal(row["price"]),
            "quantity": Decimal(row["volume"]),
            "timestamp": datetime.strptime(f"{row['date']} {row['time']}", "%m/%d/%Y %H:%M:%S.%f")
            .replace(tzinfo=sydney)
            .astimezone(UTC),
            "currency": "AUD",
            "side": "UNKNOWN",
            "trade_conditions": None,
            "source_sequence": n,
            "ingestion_timestamp": ingested,
            "platform_sequence": None,
            "vendor_data": None,
        }
        for n, row in enumerate(raw.head(2000).iter_rows(named=True))
    ]
    iceberg.trades().append(to_arrow(records, TRADES))
    return len(records)


@pytest.fixture
def tail_calls(monkeypatch) -> list[str]:
    """What the hybrid reads asked Kafka, in order (see tests/support/tail_calls.py): the tests assert
    that code path (no call; failed at the first bounded look-up) rather than seconds."""
    return record_tail_calls(monkeypatch)


@pytest.fixture
def committed(k2_home, kafka_broker, topic_name):
    iceberg = IcebergResource()
    source, boundary = _commit_half(KafkaResource(), iceberg, topic_name)
    bhp_rows = _load_bhp(iceberg)
    return topic_name, source, boundary, bhp_rows


def _down(topic: str, **settings) -> HybridQueryResource:
    """A hybrid resource whose Kafka is a closed port, with ``topic`` declared as carrying BINANCE."""
    return HybridQueryResource(
        kafka=KafkaResource(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        topics=[topic],
        topic_exchanges={topic: ["BINANCE"]},
        **settings,
    )


def test_windows_kafka_cannot_hold_are_answered_without_kafka(committed, tail_calls):
    topic, source, boundary, bhp_rows = committed
    hybrid = _down(topic, max_trade_lateness_seconds=5)
    try:
        # ASX has no topic: the tail is never asked anything, with or without the exchange named.
        for exchange in ("ASX", None):
            frame = hybrid.trades(["BHP"], ASX_START, ASX_END, exchange=exchange)
            assert frame.height == bhp_rows > 0
            assert tail_calls == [], f"exchange={exchange}: Kafka was asked {tail_calls}"
            stats = hybrid.last_stats
            assert topic in stats.kafka_skipped and stats.kafka_rows == 0 and not stats.partial
            assert ("carries only BINANCE" if exchange else "before the newest committed") in stats.kafka_skipped[topic]

        # A Binance window ending more than the lateness before the newest committed trade: exact from Iceberg.
        newest_committed = max(r["timestamp"] for r in source.rows if r["offset"] < boundary[r["partition"]])
        start, end = source.rows[0]["timestamp"], newest_committed - timedelta(seconds=6)
        frame = hybrid.trades(["BTCUSDT", "ETHUSDT"], start, end)
        expected = source.expected(["BTCUSDT", "ETHUSDT"], start, end)  # every produced trade, committed or not
        assert expected and frame["message_id"].to_list() == expected
        assert tail_calls == [] and topic in hybrid.last_stats.kafka_skipped
    finally:
        hybrid.close()


def test_a_needed_tail_fails_fast_naming_the_fix_or_gives_the_iceberg_part_when_asked(committed, caplog, tail_calls):
    topic, source, boundary, _ = committed
    hybrid = _down(topic)
    try:
        with pytest.raises(KafkaUnavailableError) as failure:
            hybrid.trades(["BTCUSDT"])
        # Fast: the first bounded look-up failed; the read (its minute-long poll loop) was never tried.
        assert tail_calls == ["partitions"]
        message = str(failure.value)
        assert "k2 kafka start" in message and "allow_partial=True" in message
        for partition, offset in boundary.items():
            assert f"{topic}[{partition}] offsets {offset}.." in message

        with caplog.at_level(logging.WARNING, logger="k2_resources.trades.hybrid"):
            with pytest.warns(KafkaTailMissingWarning, match=rf"{topic}\[0\] offsets {boundary[0]}\.\."):
                frame = hybrid.trades(["BTCUSDT"], allow_partial=True)
        assert frame["message_id"].to_list() == source.expected(["BTCUSDT"], None, None, below=boundary)
        assert hybrid.last_stats.partial and hybrid.last_stats.kafka_rows == 0
        assert any(f"{topic}[1] offsets {boundary[1]}.." in r.getMessage() for r in caplog.records)
        assert tail_calls == ["partitions", "partitions"]
    finally:
        hybrid.close()


def test_k2_query_trades_allow_partial_and_fast_errors(committed, monkeypatch, capsys, tail_calls):
    topic, source, boundary, bhp_rows = committed
    monkeypatch.setenv("K2_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")

    # ASX never reads Kafka (the default topic carries BINANCE only).
    assert (
        main(
            [
                "query",
                "trades",
                "--symbol",
                "BHP",
                "--exchange",
                "ASX",
                "--start",
                ASX_START.isoformat(),
                "--end",
                ASX_END.isoformat(),
                "--format",
                "csv",
                "--limit",
                "0",
            ]
        )
        == 0
    )
    assert tail_calls == [], f"an ASX query asked Kafka {tail_calls}"
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) == bhp_rows + 1 and "warning" not in out.err

    assert main(["query", "trades", "--symbol", "BTCUSDT", "--topic", topic]) == 2
    assert tail_calls == ["partitions"]  # failed at the first bounded look-up, never reached the read
    err = capsys.readouterr().err
    assert err.startswith("k2: ") and "--allow-partial" in err and f"{topic}[0] offsets {boundary[0]}.." in err

    assert (
        main(
            [
                "query",
                "trades",
                "--symbol",
                "BTCUSDT",
                "--topic",
                topic,
                "--allow-partial",
                "--format",
                "csv",
                "--limit",
                "0",
                "--columns",
                "trade_id",
            ]
        )
        == 0
    )
    out = capsys.readouterr()
    assert len(out.out.strip().splitlines()) - 1 == len(source.expected(["BTCUSDT"], None, None, below=boundary))
    assert out.err.count("warning: Kafka is unreachable") == 1 and f"{topic}[2] offsets {boundary[2]}.." in out.err


@pytest.mark.timeout(240)
def test_a_resource_whose_broker_stops_fails_fast(k2_home, tmp_path, topic_name, tail_calls):
    """The notebook case: a resource with a live consumer, then the broker stops."""
    broker = KafkaBroker(home=tmp_path / "kafka", port=free_port(), controller_port=free_port())
    broker.start()
    try:
        kafka, iceberg = KafkaResource(bootstrap_servers=broker.bootstrap_servers), IcebergResource()
        source, boundary = _commit_half(kafka, iceberg, topic_name)
        hybrid = HybridQueryResource(kafka=kafka, topics=[topic_name])
        everything = source.expected(["BTCUSDT"], None, None)
        assert hybrid.trades(["BTCUSDT"])["message_id"].to_list() == everything
        assert hybrid.last_stats.kafka_rows > 0
        assert "read" in tail_calls  # the live consumer read the tail
        broker.stop()

        del tail_calls[:]
        with pytest.raises(KafkaUnavailableError, match="k2 kafka start"):
            hybrid.trades(["BTCUSDT"])
        # Fast: a bounded look-up failed first; the read's poll loop was never entered.
        assert "read" not in tail_calls, tail_calls
        with pytest.warns(KafkaTailMissingWarning):
            partial = hybrid.trades(["BTCUSDT"], allow_partial=True)
        assert partial["message_id"].to_list() == source.expected(["BTCUSDT"], None, None, below=boundary)
        hybrid.close()
    finally:
        broker.stop()
