"""`k2 stream binance`: Binance trades into Kafka, live or from the bundled recording.

The default source is the live endpoint; when it cannot be reached (no network) the command
says so in one line and streams the bundled recording from an in-process recording server
instead, looping with current times, so `make run` always streams.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading

from k2_resources.binance.client import DEFAULT_SYMBOLS, LIVE_BASE_URL, combined_stream_url, probe
from k2_resources.binance.streamer import (
    DEFAULT_METRICS_PORT,
    DEFAULT_PARTITIONS,
    StreamerConfig,
    StreamMetrics,
    StreamStats,
    run_streamer,
    run_with_local_recording,
)
from k2_resources.kafka.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_TOPIC


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("stream", help="stream a live source into Kafka")
    sources = parser.add_subparsers(dest="stream_source", required=True)
    binance = sources.add_parser("binance", help="Binance spot trades -> Kafka (trade V2 Avro)")
    binance.add_argument(
        "--source",
        choices=["live", "recording"],
        default=os.environ.get("K2_STREAM_SOURCE", "live"),
        help="live Binance (default; falls back to the recording when unreachable) or the bundled "
        "recording (env K2_STREAM_SOURCE)",
    )
    binance.add_argument("--url", default=LIVE_BASE_URL, help=f"live endpoint (default {LIVE_BASE_URL})")
    binance.add_argument(
        "--symbols",
        nargs="+",
        metavar="SYMBOL",
        default=os.environ.get("K2_STREAM_SYMBOLS", " ".join(DEFAULT_SYMBOLS)).split(),
        help="symbols to stream (env K2_STREAM_SYMBOLS, space-separated)",
    )
    binance.add_argument("--max-messages", type=int, default=None, help="stop after N frames received")
    binance.add_argument(
        "--speed",
        type=float,
        default=float(os.environ.get("K2_STREAM_SPEED", "1")),
        help="playback speed factor (default 1 = as recorded; 0 = as fast as possible; env K2_STREAM_SPEED)",
    )
    binance.add_argument(
        "--once",
        action="store_true",
        default=os.environ.get("K2_STREAM_ONCE", "") == "1",
        help="play the recording once instead of looping (env K2_STREAM_ONCE=1)",
    )
    binance.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    binance.add_argument("--dlq-topic", default=BINANCE_TRADES_DLQ_TOPIC)
    binance.add_argument("--partitions", type=int, default=DEFAULT_PARTITIONS)
    binance.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("K2_STREAMER_METRICS_PORT", DEFAULT_METRICS_PORT)),
        help=f"/metrics port on 127.0.0.1 (default {DEFAULT_METRICS_PORT}; 0 = a free port; "
        "env K2_STREAMER_METRICS_PORT)",
    )
    binance.set_defaults(handler=_run)


def streamer_config(args: argparse.Namespace) -> StreamerConfig:
    """The streamer settings parsed `k2 stream binance` arguments ask for (the command serves the metrics)."""
    return StreamerConfig(
        url=args.url,
        symbols=tuple(s.upper() for s in args.symbols),
        topic=args.topic,
        dlq_topic=args.dlq_topic,
        partitions=args.partitions,
        metrics_port=None,
    )


def _run(args: argparse.Namespace) -> int:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    config = streamer_config(args)
    metrics = StreamMetrics()
    port = metrics.serve(args.metrics_port)
    try:
        stats = asyncio.run(_stream(args, config, metrics, stop))
    finally:
        metrics.close()
    print(
        f"stopped ({stats.ended_by}): received {stats.received}, produced {stats.produced}, "
        f"dead-lettered {stats.dead_lettered}, duplicates dropped {stats.duplicates}, gaps {stats.gaps} "
        f"({stats.gaps_filled} filled with {stats.backfilled} trades, {stats.gaps_unfilled} unfilled: "
        f"{stats.ids_unfilled} ids lost, see `k2 offsets gaps`), "
        f"reconnects {stats.reconnects}; metrics were on port {port}",
        flush=True,
    )
    return 1 if stats.produce_errors else 0


async def _stream(
    args: argparse.Namespace, config: StreamerConfig, metrics: StreamMetrics, stop: threading.Event
) -> StreamStats:
    options = dict(max_messages=args.max_messages, stop_event=stop, metrics=metrics)
    destination = (
        f"Kafka topic {config.topic} (dead letters: {config.dlq_topic}), metrics on "
        f"http://127.0.0.1:{metrics.port}/metrics"
    )
    speed = args.speed if args.speed > 0 else None
    if args.source == "live":
        url = combined_stream_url(config.url, config.symbols)
        reason = await probe(url)
        if reason is None:
            print(f"streaming live {url} -> {destination}", flush=True)
            return await run_streamer(config, **options)
        print(
            f"live Binance endpoint {url} is unreachable ({reason}); streaming the bundled recording "
            f"from a local recording server instead -> {destination}",
            flush=True,
        )
    else:
        print(f"streaming the bundled recording from a local recording server -> {destination}", flush=True)
    return await run_with_local_recording(config, speed=speed, loop=not args.once, **options)
