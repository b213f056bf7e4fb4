"""Kafka stops while the streamer runs: frames wait in a bounded window, then in the spool under
K2_HOME, and reach Kafka in order, each exactly once, when the broker is back (issue 13, item 6).

The broker here is a dedicated one (the session's shared broker is never stopped)."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import replace

import pytest
from kafka import TopicPartition

from k2_resources.binance.recording_server import RecordingServerThread, load_recorded_trades
from k2_resources.binance.streamer import StreamerConfig, StreamMetrics, StreamStats, run_streamer
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.spool_store import SEGMENT_SUFFIX
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.platform.kafka_broker import KafkaBroker, free_port
from k2_resources.schemas import decode_trade
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

BEFORE_OUTAGE = 50  # frames acknowledged before the broker stops (the producer knows the topic)
DURING_OUTAGE = 2_000  # frames the server sends while the broker is down
WINDOW = 200  # records kept in memory awaiting Kafka's acknowledgement
PAUSE_MS = 3_600_000  # the tape pauses an hour after the first frames; the test ends the pause
RECORDING_2024_MS = 1_722_000_000_000  # the 2024 part of the recording has both symbols


def _tape() -> list:
    """Real recorded trades, re-timed: BEFORE_OUTAGE of them, an hour's pause, then DURING_OUTAGE more."""
    trades = [t for t in load_recorded_trades() if t.time_ms >= RECORDING_2024_MS][: BEFORE_OUTAGE + DURING_OUTAGE]
    assert {t.symbol for t in trades} == {"BTCUSDT", "ETHUSDT"}
    start = trades[0].time_ms
    return [
        replace(trade, time_ms=start + i + (PAUSE_MS if i >= BEFORE_OUTAGE else 0)) for i, trade in enumerate(trades)
    ]


def _read_all(kafka: KafkaResource, topic: str) -> list:
    ends = kafka.end_offsets(topic)
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in ends]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records: list = []
    wait_for(
        lambda: (
            records.extend(r for batch in consumer.poll(timeout_ms=500).values() for r in batch)
            or all(consumer.position(tp) >= ends[tp.partition] for tp in partitions)
        ),
        timeout_s=60,
        what=f"reading {topic} to its end offsets {ends}",
        interval_s=0,
    )
    consumer.close()
    return records


def _metric(metrics: StreamMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


@pytest.mark.timeout(420)
def test_frames_sent_while_kafka_is_down_are_spooled_and_land_once_in_order(tmp_path, k2_home):
    broker = KafkaBroker(home=tmp_path / "kafka", port=free_port(), controller_port=free_port())
    broker.start()
    kafka = KafkaResource(bootstrap_servers=broker.bootstrap_servers, request_timeout_ms=10_000)
    topic = "market.trades.binance.outage"
    metrics = StreamMetrics()
    stop = threading.Event()
    outcome: dict[str, object] = {}
    try:
        with RecordingServerThread(speed=1.0, trades=_tape(), max_pause_ms=PAUSE_MS, resume_overlap=0) as server:
            config = StreamerConfig(
                url=server.base_url,
                symbols=("BTCUSDT", "ETHUSDT"),
                topic=topic,
                dlq_topic=dead_letter_topic(topic),
                metrics_port=None,
                backoff_initial_s=0.05,
                backoff_max_s=0.5,
                max_buffered=WINDOW,
                close_timeout_s=300,
            )

            def stream() -> None:
                try:
                    outcome["stats"] = asyncio.run(run_streamer(config, kafka, stop_event=stop, metrics=metrics))
                except BaseException as exc:  # reported by the assertions below
                    outcome["error"] = exc

            streamer = threading.Thread(target=stream, name="streamer", daemon=True)
            streamer.start()
            wait_for(
                lambda: sum(kafka.end_offsets(topic).values()) == BEFORE_OUTAGE,
                timeout_s=120,
                what=f"the first {BEFORE_OUTAGE} frames in Kafka",
            )
            wait_for(
                lambda: _metric(metrics, "k2_binance_buffered_frames") == 0,
                timeout_s=30,
                what="the first frames acknowledged",
            )

            broker.stop()
            assert not broker.is_ready(timeout_s=1)
            server.server.speed = None  # end the tape's pause: the rest comes as fast as the socket takes
            server.drop_connections()  # the client reconnects and resumes right after the first frames
            wait_for(lambda: server.stats().finished, timeout_s=120, what="the server to send every frame")
            spool = k2_home / "spool" / topic
            wait_for(
                lambda: _metric(metrics, "k2_binance_spooled_frames_total", {"topic": topic}) == DURING_OUTAGE - WINDOW,
                timeout_s=60,
                what="the frames past the window to be spooled",
            )
            # Bounded: exactly the window waits in memory, everything else is on disk, nothing is dropped.
            assert _metric(metrics, "k2_binance_buffered_frames") == WINDOW
            assert _metric(metrics, "k2_binance_spool_pending_frames") == DURING_OUTAGE - WINDOW
            assert list(spool.glob(f"*{SEGMENT_SUFFIX}"))
            assert streamer.is_alive()

            broker.start()
            streamer.join(timeout=300)
            assert not streamer.is_alive(), "the streamer did not finish after the broker came back"
            sent = server.stats()
        assert "error" not in outcome, outcome.get("error")
        stats = outcome["stats"]
        assert isinstance(stats, StreamStats)
        total = BEFORE_OUTAGE + DURING_OUTAGE
        assert stats.ended_by == "end_of_recording"
        assert (stats.received, stats.produced, stats.duplicates, stats.dead_lettered) == (total, total, 0, 0)
        assert (stats.spooled, stats.replayed, stats.undelivered, stats.produce_errors) == (
            DURING_OUTAGE - WINDOW,
            DURING_OUTAGE - WINDOW,
            0,
            0,
        )
        assert list(spool.glob("*")) == []  # segments deleted once Kafka acknowledged them

        records = _read_all(kafka, topic)
        trades = [decode_trade(record.value) for record in records]
        keys = [(trade["symbol"], trade["source_sequence"]) for trade in trades]
        assert len(keys) == total and not [k for k, n in Counter(keys).items() if n > 1]
        assert set(keys) == {(symbol, i) for symbol, ids in sent.trade_ids.items() for i in ids}
        # in order per symbol: each symbol is one partition, and its offsets follow its trade ids
        for symbol in ("BTCUSDT", "ETHUSDT"):
            mine = sorted(
                ((r.partition, r.offset), t["source_sequence"])
                for r, t in zip(records, trades)
                if t["symbol"] == symbol
            )
            assert len({partition for (partition, _), _ in mine}) == 1
            ids = [trade_id for _, trade_id in mine]
            assert ids == sorted(ids), f"{symbol} is out of order in Kafka"
    finally:
        stop.set()
        broker.stop()
