"""The Binance source end to end up to Kafka: the recording server, the client and the streamer,
against a real Kafka broker. Exactly once is checked by (symbol, trade id) against what the
server says it sent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter

import pytest
from kafka import TopicPartition
from websockets.sync.client import connect as sync_connect

from k2_resources.binance.recording_server import RecordingServerThread, ServerStats
from k2_resources.binance.streamer import StreamMetrics, stream_to_kafka
from k2_resources.kafka.dead_letters import STREAM, read_dead_letter
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.paths import PROJECT_ROOT
from k2_resources.platform.kafka_broker import free_port
from k2_resources.schemas import decode_trade

pytestmark = pytest.mark.integration

SYMBOLS = ["BTCUSDT", "ETHUSDT", "BNBUSDT"]  # no BNBUSDT in the recording: that stream stays quiet
RECORDED_TRADES = 23_048 + 14_515  # data/binance/SOURCE.md


def _read_topic(kafka: KafkaResource, topic: str, timeout_s: float = 60) -> list:
    """Every record of the topic, from the beginning up to the end offsets read now."""
    ends = kafka.end_offsets(topic)
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in ends]
    consumer.assign(partitions)
    consumer.seek_to_beginning(*partitions)
    records = []
    deadline = time.monotonic() + timeout_s
    while any(consumer.position(tp) < ends[tp.partition] for tp in partitions):
        assert time.monotonic() < deadline, f"could not read {topic} to its end offsets {ends} in {timeout_s} s"
        for batch in consumer.poll(timeout_ms=500).values():
            records.extend(batch)
    consumer.close()
    return records


def _sent_keys(stats: ServerStats) -> set[tuple[str, int]]:
    return {(symbol, trade_id) for symbol, ids in stats.trade_ids.items() for trade_id in ids}


def _assert_exactly_once(kafka: KafkaResource, topic: str, sent: ServerStats) -> list[dict]:
    records = _read_topic(kafka, topic)
    trades = [decode_trade(record.value) for record in records]
    keys = [(trade["symbol"], trade["source_sequence"]) for trade in trades]
    repeated = [key for key, count in Counter(keys).items() if count > 1]
    assert not repeated, f"{len(repeated)} trades are in the topic more than once, e.g. {repeated[:3]}"
    assert set(keys) == _sent_keys(sent)
    assert len(trades) == sent.unique_trades
    # keyed by symbol: one symbol, one partition, in trade-id order
    partitions_of = {}
    for record, trade in zip(records, trades):
        assert record.key == trade["symbol"].encode()
        partitions_of.setdefault(trade["symbol"], set()).add(record.partition)
    assert all(len(parts) == 1 for parts in partitions_of.values())
    return trades


def test_clean_run_puts_every_sent_trade_in_kafka_exactly_once(kafka_broker, topic_name):
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    with RecordingServerThread(speed=None) as server:
        stats = stream_to_kafka(
            server.stream_url(SYMBOLS),
            topic_name,
            kafka,
            dlq_topic=dead_letter_topic(topic_name),
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
        )
        sent = server.stats()

    assert sent.finished and stats.ended_by == "end_of_recording"
    assert sent.unique_trades == sent.trade_frames == RECORDED_TRADES
    assert stats.produced == RECORDED_TRADES and stats.duplicates == 0 and stats.dead_lettered == 0
    assert stats.produce_errors == 0 and stats.reconnects == 0
    # the recording has one real gap: BTCUSDT jumps from the 2023 window to the 2024 window
    assert stats.gaps == 1
    trades = _assert_exactly_once(kafka, topic_name, sent)
    first = next(t for t in trades if t["source_sequence"] == 3735692997)
    assert first["trade_id"] == "BINANCE-3735692997" and first["side"] == "BUY"  # m=false in the CSV
    assert str(first["price"]) == "61686.00000000" and str(first["quantity"]) == "0.00705000"
    assert sum(kafka.end_offsets(dead_letter_topic(topic_name)).values()) == 0


def test_forced_disconnects_and_repeats_leave_each_trade_once(kafka_broker, topic_name):
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    with RecordingServerThread(
        speed=None, resume_overlap=5, drop_after=4_000, max_drops=5, repeat_every=500, repeat_count=3
    ) as server:
        stats = stream_to_kafka(
            server.stream_url(SYMBOLS),
            topic_name,
            kafka,
            dlq_topic=dead_letter_topic(topic_name),
            backoff_initial_s=0.01,
            backoff_max_s=0.1,
        )
        sent = server.stats()

    assert sent.finished and sent.drops == 5 and sent.repeated_frames > 0
    assert stats.reconnects == 5
    assert sent.unique_trades == RECORDED_TRADES
    # every frame beyond the distinct trades (repeats and resumed overlaps) was dropped by the tracker
    assert sent.trade_frames > sent.unique_trades
    assert stats.duplicates == sent.trade_frames - sent.unique_trades
    assert stats.produced == sent.unique_trades
    _assert_exactly_once(kafka, topic_name, sent)


def test_drop_on_request_and_proactive_rotation_lose_nothing(kafka_broker, topic_name):
    """A drop requested mid-stream from the control API, and reconnects before the connection
    age limit (the 24-hour rule, shortened), with trades paced at 200x the recorded speed."""
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    result = {}
    with RecordingServerThread(speed=200, limit=3_000) as server:
        worker = threading.Thread(
            target=lambda: result.update(
                stats=stream_to_kafka(
                    server.stream_url(SYMBOLS),
                    topic_name,
                    kafka,
                    dlq_topic=dead_letter_topic(topic_name),
                    backoff_initial_s=0.01,
                    backoff_max_s=0.1,
                    max_connection_age_s=0.4,
                )
            )
        )
        worker.start()
        deadline = time.monotonic() + 30
        while server.stats().trade_frames < 1_000:
            assert time.monotonic() < deadline, "the stream did not reach 1,000 trades in 30 s"
            time.sleep(0.05)
        server.drop_connections()
        worker.join(timeout=120)
        assert not worker.is_alive()
        sent = server.stats()

    stats = result["stats"]
    assert sent.finished and sent.drops >= 1
    # Every rotation is a reconnect. The requested drop is one more, unless it hit a connection the
    # client was already closing to rotate (0.4 s age limit): then both are the same reconnect. That
    # the stream went on after the drop is shown by the finished recording and the counts below.
    assert stats.rotations >= 2 and stats.reconnects >= stats.rotations
    assert sent.unique_trades == 3_000 == stats.produced
    _assert_exactly_once(kafka, topic_name, sent)


def test_malformed_frames_go_to_the_dead_letter_topic_and_the_stream_goes_on(kafka_broker, topic_name):
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    dlq = dead_letter_topic(topic_name)
    with RecordingServerThread(speed=None, limit=10_000, malformed_every=997) as server:
        server.inject_frame('{"result":null,"id":1}')  # a subscription reply: not a trade
        stats = stream_to_kafka(server.stream_url(SYMBOLS), topic_name, kafka, dlq_topic=dlq)
        sent = server.stats()

    assert sent.malformed_frames == 10 and sent.injected_frames == 1
    assert stats.dead_lettered == 11 and stats.produced == sent.unique_trades == 10_000
    _assert_exactly_once(kafka, topic_name, sent)

    letters = _read_topic(kafka, dlq)
    values = [read_dead_letter(record.value, record.headers) for record in letters]
    assert len(values) == 11
    expected_reason = {"truncated_json": "invalid_json", "missing_price": "missing_field", "bad_price": "bad_number"}
    by_raw = {value.text: value for value in values}
    for kind, frame in sent.malformed:
        letter = by_raw[frame]  # the raw payload, unchanged
        assert letter.reason == expected_reason[kind] and letter.detail
        assert letter.source == "binance" and letter.stage == STREAM and letter.failed_at
    assert by_raw['{"result":null,"id":1}'].reason == "unexpected_event"
    for record, value in zip(letters, values):
        assert dict(record.headers)["k2.reason"] == value.reason.encode()


def test_a_restarted_streamer_recognises_what_its_previous_run_produced(kafka_broker, topic_name):
    """Dedupe survives a restart: the second run reads the topic's tail back into its duplicate check,
    so a source that starts again from the beginning adds nothing, and new trades still go through."""
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    dlq = dead_letter_topic(topic_name)
    with RecordingServerThread(speed=None, limit=3_000) as server:
        server.set_faults(drop_after=2_000, max_drops=1)  # the first run stops after 2,000 trades
        first = stream_to_kafka(server.stream_url(SYMBOLS), topic_name, kafka, dlq_topic=dlq, max_messages=2_000)
        server.reset()  # the source forgets where the client stopped: it sends everything again
        second = stream_to_kafka(
            server.stream_url(SYMBOLS), topic_name, kafka, dlq_topic=dlq, backoff_initial_s=0.01, backoff_max_s=0.1
        )
        sent = server.stats()
    assert first.produced == 2_000 and first.seeded == 0
    assert second.seeded == 2_000
    assert second.received == 3_000 and second.duplicates == 2_000 and second.produced == 1_000
    _assert_exactly_once(kafka, topic_name, sent)


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def _total(samples: dict[str, float], metric: str) -> float:
    return sum(value for name, value in samples.items() if name == metric or name.startswith(metric + "{"))


def test_metrics_endpoint_serves_the_counters(kafka_broker, topic_name):
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    port = free_port()
    stop = threading.Event()
    metrics = StreamMetrics()
    result = {}
    with RecordingServerThread(speed=None, loop=True) as server:
        worker = threading.Thread(
            target=lambda: result.update(
                stats=stream_to_kafka(
                    server.stream_url(SYMBOLS),
                    topic_name,
                    kafka,
                    dlq_topic=dead_letter_topic(topic_name),
                    stop_event=stop,
                    metrics_port=port,
                    metrics=metrics,
                    backoff_initial_s=0.01,
                    backoff_max_s=0.1,
                )
            )
        )
        worker.start()

        def wait_for(metric: str, at_least: float) -> dict[str, float]:
            deadline = time.monotonic() + 60
            while True:
                try:
                    samples = _scrape(port)
                    if _total(samples, metric) >= at_least:
                        return samples
                except OSError:
                    pass  # the endpoint is not up yet
                assert time.monotonic() < deadline, f"{metric} did not reach {at_least} in 60 s"
                time.sleep(0.1)

        wait_for("k2_binance_trades_produced_total", 5_000)
        server.inject_frame("not json at all")
        wait_for("k2_binance_dead_letters_total", 1)
        server.drop_connections()
        samples = wait_for("k2_binance_reconnects_total", 1)
        stop.set()
        worker.join(timeout=60)
        assert not worker.is_alive()

    stats = result["stats"]
    assert stats.ended_by == "stop"
    assert samples['k2_binance_dead_letters_total{reason="invalid_json"}'] == 1
    assert _total(samples, "k2_binance_event_to_produce_seconds_count") >= 5_000
    # the registry's final values equal the run's own counts
    registry = metrics.registry
    assert registry.get_sample_value("k2_binance_messages_received_total") == stats.received
    produced = sum(registry.get_sample_value("k2_binance_trades_produced_total", {"symbol": s}) or 0 for s in SYMBOLS)
    assert produced == stats.produced > 5_000
    assert registry.get_sample_value("k2_binance_reconnects_total") == stats.reconnects >= 1
    duplicates = sum(
        registry.get_sample_value("k2_binance_duplicates_dropped_total", {"symbol": s}) or 0 for s in SYMBOLS
    )
    assert duplicates == stats.duplicates
    assert registry.get_sample_value("k2_binance_event_to_produce_seconds_count") == stats.produced
    with pytest.raises(OSError):
        _scrape(port)  # the endpoint stops with the stream


def test_quiet_stream_keeps_its_connection_by_answering_pings_and_ends_on_idle_timeout(kafka_broker, topic_name):
    """No BNBUSDT in the recording: the stream stays quiet. The server pings every 0.5 s and drops
    a connection whose pong is 2 s late (room for a busy machine), so a client that did not answer
    would lose its connection by 2.5 s: one connection for 4 s means the client answered."""
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    with RecordingServerThread(speed=None, ping_interval=0.5, ping_timeout=2.0) as server:
        started = time.monotonic()
        stats = stream_to_kafka(
            server.stream_url(["BNBUSDT"]),
            topic_name,
            kafka,
            dlq_topic=dead_letter_topic(topic_name),
            idle_timeout_s=4.0,
            backoff_initial_s=0.01,
        )
        elapsed = time.monotonic() - started
        sent = server.stats()
    assert stats.ended_by == "idle" and stats.received == 0 and stats.produced == 0
    assert elapsed >= 4.0
    assert sent.connections == 1 and stats.reconnects == 0


def _k2(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", *args],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_k2_stream_binance_falls_back_to_the_recording_in_one_line(kafka_broker, topic_name, k2_home):
    env = dict(os.environ, K2_KAFKA_BOOTSTRAP=kafka_broker.bootstrap_servers)
    unreachable = f"ws://127.0.0.1:{free_port()}"  # nothing listens there
    done = _k2(
        "stream",
        "binance",
        "--url",
        unreachable,
        "--max-messages",
        "500",
        "--speed",
        "0",
        "--metrics-port",
        "0",
        "--topic",
        topic_name,
        "--dlq-topic",
        dead_letter_topic(topic_name),
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2, done.stdout
    assert "unreachable" in lines[0] and "local recording server" in lines[0]
    assert "produced 500" in lines[1]
    kafka = KafkaResource(bootstrap_servers=kafka_broker.bootstrap_servers)
    trades = [decode_trade(record.value) for record in _read_topic(kafka, topic_name)]
    assert len(trades) == 500
    # looping playback with the "now" time base: trades carry current times
    newest = max(trade["timestamp"] for trade in trades).timestamp()
    assert abs(newest - time.time()) < 3600


def test_k2_binance_server_serves_the_combined_stream(k2_home):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "k2_assets.cli", "binance-server", "--port", str(port), "--once", "--speed", "0"],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        banner = server.stdout.readline()
        assert f"ws://127.0.0.1:{port}/stream?streams=" in banner
        with sync_connect(
            f"ws://127.0.0.1:{port}/stream?streams=ethusdt@trade", max_queue=None, close_timeout=1
        ) as connection:
            frames = [json.loads(connection.recv(timeout=10)) for _ in range(3)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert [frame["stream"] for frame in frames] == ["ethusdt@trade"] * 3
    first = frames[0]["data"]
    assert first == {
        "e": "trade",
        "E": 1723161255611,
        "s": "ETHUSDT",
        "t": 1520538925,
        "p": "2683.80000000",
        "q": "0.00200000",
        "T": 1723161255611,
        "m": True,
        "M": True,
    }
    assert [frame["data"]["t"] for frame in frames] == [1520538925, 1520538926, 1520538927]
