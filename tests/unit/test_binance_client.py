"""The client's pure parts: backoff delays, stream URLs, the recording server's loop shifts, CLI settings."""

from __future__ import annotations

import random

from k2_assets.cli import build_parser
from k2_assets.cli.stream import streamer_config
from k2_resources.binance.client import DEFAULT_LIVE_URL, backoff_delay, combined_stream_url
from k2_resources.binance.recording_server import RecordedTrade, RecordingServer, requested_symbols
from k2_resources.kafka.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_PARTITIONS, BINANCE_TRADES_TOPIC


def test_backoff_doubles_from_the_initial_delay_to_the_cap_within_the_jitter():
    rng = random.Random(7)
    for attempt, base in enumerate([1, 2, 4, 8, 16, 32, 60, 60]):
        delays = [backoff_delay(attempt, 1.0, 60.0, 0.25, rng) for _ in range(200)]
        assert all(base * 0.75 <= d <= base * 1.25 for d in delays)
        assert max(delays) - min(delays) > base * 0.2  # jittered, not a fixed value
    assert backoff_delay(10_000, 0.01, 0.1, 0.0) == 0.1


def test_stream_urls():
    assert DEFAULT_LIVE_URL == "wss://stream.binance.com:9443/stream?streams=btcusdt@trade/ethusdt@trade/bnbusdt@trade"
    assert (
        combined_stream_url("ws://127.0.0.1:9443/", ["BTCUSDT"]) == "ws://127.0.0.1:9443/stream?streams=btcusdt@trade"
    )
    assert combined_stream_url(DEFAULT_LIVE_URL, ["XRPUSDT"]) == DEFAULT_LIVE_URL
    assert requested_symbols("/stream?streams=btcusdt@trade/ethusdt@depth/bnbusdt@trade") == {"BTCUSDT", "BNBUSDT"}
    assert requested_symbols("/ws/btcusdt@trade") is None


def test_looping_shifts_times_and_ids_forward_so_they_stay_unique_and_increasing():
    trades = [
        RecordedTrade("BTCUSDT", 100, "1.0", "1.0", 1_000, True),
        RecordedTrade("ETHUSDT", 7, "2.0", "1.0", 1_500, False),
        RecordedTrade("BTCUSDT", 101, "1.5", "1.0", 2_000, False),
    ]
    server = RecordingServer(trades=trades, loop=True)
    view = server._view(("BTCUSDT", "ETHUSDT"))
    values = [server._values(view, position)[:3] for position in range(9)]
    btc = [(time_ms, trade_id) for trade, time_ms, trade_id in values if trade.symbol == "BTCUSDT"]
    assert btc == [(1_000, 100), (2_000, 101), (2_001, 102), (3_001, 103), (3_002, 104), (4_002, 105)]
    eth = [(time_ms, trade_id) for trade, time_ms, trade_id in values if trade.symbol == "ETHUSDT"]
    assert eth == [(1_500, 7), (2_501, 8), (3_502, 9)]


def test_k2_stream_binance_needs_no_settings_and_takes_a_local_url_and_symbols():
    args = build_parser().parse_args(["stream", "binance"])
    config = streamer_config(args)
    assert config.stream_url == DEFAULT_LIVE_URL
    assert (config.topic, config.dlq_topic, config.partitions) == (
        BINANCE_TRADES_TOPIC,
        BINANCE_TRADES_DLQ_TOPIC,
        BINANCE_TRADES_PARTITIONS,
    )
    assert args.metrics_port == 9464 and args.source == "live"
    chosen = streamer_config(
        build_parser().parse_args(["stream", "binance", "--symbols", "xrpusdt", "--url", "ws://127.0.0.1:9443"])
    )
    assert chosen.stream_url == "ws://127.0.0.1:9443/stream?streams=xrpusdt@trade"
