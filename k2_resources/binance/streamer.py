"""The Binance producer pipeline: WebSocket client -> normaliser -> trade-id tracker -> Kafka.

Trades go to ``market.trades.binance`` as framed Avro trade V2 records (k2_resources.schemas),
keyed by symbol (so each symbol stays in order in one partition), through the idempotent
producer of KafkaResource (acks=all).

Dead letters: a frame that is not a valid trade goes to ``market.trades.binance.dlq`` and the
stream goes on. Each dead letter's value is UTF-8 JSON::

    {"source": "binance", "url": "<stream url>", "reason": "<code>", "detail": "<why>",
     "raw": "<the frame exactly as received>", "received_at": "<ISO-8601 UTC>"}

and its headers repeat ``k2.reason`` (the code) and ``k2.source`` (``binance``), so a consumer
can filter without parsing. Reason codes are those of MalformedTradeMessage (invalid_json,
missing_field, bad_number, unexpected_event, ...) plus schema_mismatch.

Metrics (prometheus_client, a registry of the streamer's own, served on 127.0.0.1):
``k2_binance_messages_received_total``, ``k2_binance_trades_produced_total{symbol}``,
``k2_binance_dead_letters_total{reason}``, ``k2_binance_duplicates_dropped_total{symbol}``,
``k2_binance_reconnects_total``, ``k2_binance_trade_id_gaps_total{symbol}``,
``k2_binance_missing_trade_ids_total{symbol}``, ``k2_binance_produce_errors_total`` and the
histogram ``k2_binance_event_to_produce_seconds`` (event time ``E`` to the hand-over to the producer).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from k2_resources.binance.client import (
    BINANCE_MAX_CONNECTION_AGE_S,
    LIVE_BASE_URL,
    DEFAULT_SYMBOLS,
    BinanceStreamClient,
    StopSignal,
    TrackVerdict,
    TradeIdTracker,
    combined_stream_url,
)
from k2_resources.binance.normalise import MalformedTradeMessage, normalise_trade
from k2_resources.binance.recording_server import RecordingServer
from k2_resources.errors import K2Error, SchemaMismatchError
from k2_resources.kafka import KafkaResource
from k2_resources.schemas import encode_trade
from k2_resources.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_TOPIC

log = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9464
DEFAULT_PARTITIONS = 3
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


@dataclass
class StreamerConfig:
    """Where the streamer reads from and writes to; the defaults stream live Binance into the embedded Kafka."""

    url: str = LIVE_BASE_URL  # a base URL the symbols' streams are appended to, or a full combined-stream URL
    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    topic: str = BINANCE_TRADES_TOPIC
    dlq_topic: str = BINANCE_TRADES_DLQ_TOPIC
    partitions: int = DEFAULT_PARTITIONS
    metrics_port: int | None = DEFAULT_METRICS_PORT  # None: no /metrics endpoint; 0: a free port
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    backoff_jitter: float = 0.25
    max_connection_age_s: float = BINANCE_MAX_CONNECTION_AGE_S - 1800

    @property
    def stream_url(self) -> str:
        return combined_stream_url(self.url, self.symbols)


class StreamMetrics:
    """The streamer's Prometheus metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("k2_binance_messages_received", "WebSocket frames received", registry=r)
        self.produced = Counter("k2_binance_trades_produced", "trades handed to the Kafka producer", ["symbol"],
                                registry=r)
        self.dead_lettered = Counter("k2_binance_dead_letters", "frames sent to the dead-letter topic", ["reason"],
                                     registry=r)
        self.duplicates = Counter("k2_binance_duplicates_dropped", "trades dropped as already produced",
                                  ["symbol"], registry=r)
        self.reconnects = Counter("k2_binance_reconnects", "WebSocket reconnects (incl. proactive 24 h ones)",
                                  registry=r)
        self.gaps = Counter("k2_binance_trade_id_gaps", "jumps of more than one in a symbol's trade ids",
                            ["symbol"], registry=r)
        self.missing = Counter("k2_binance_missing_trade_ids", "trade ids skipped by those jumps", ["symbol"],
                               registry=r)
        self.produce_errors = Counter("k2_binance_produce_errors", "sends the Kafka producer reported failed",
                                      registry=r)
        self.delay = Histogram("k2_binance_event_to_produce_seconds", "event time E to hand-over to Kafka",
                               buckets=DELAY_BUCKETS, registry=r)
        self._server: Any = None
        self.port: int | None = None

    def serve(self, port: int = DEFAULT_METRICS_PORT, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: a free port); returns the port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise K2Error(f"cannot serve metrics on {host}:{port} ({exc}); pass another --metrics-port "
                          "or stop the process using it") from exc
        self._server = server
        self.port = server.server_port
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@dataclass
class StreamStats:
    """What one streamer run did."""

    url: str = ""
    topic: str = ""
    dlq_topic: str = ""
    received: int = 0
    produced: int = 0
    dead_lettered: int = 0
    duplicates: int = 0
    gaps: int = 0
    missing_ids: int = 0
    reconnects: int = 0
    rotations: int = 0
    produce_errors: int = 0
    ended_by: str | None = None
    seconds: float = 0.0
    produced_by_symbol: dict[str, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Pipeline:
    """normalise -> dedupe -> encode -> produce, with dead letters and metrics."""

    def __init__(self, config: StreamerConfig, kafka: KafkaResource, metrics: StreamMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self.stats = StreamStats(url=config.stream_url, topic=config.topic, dlq_topic=config.dlq_topic)
        self.tracker = TradeIdTracker()
        kafka.ensure_topic(config.topic, partitions=config.partitions)
        kafka.ensure_topic(config.dlq_topic, partitions=1)
        self.producer = kafka.producer()
        self._errors_lock = threading.Lock()
        self._produced: dict[str, Any] = {}  # symbol -> its child of the produced counter
        self._dupes: dict[str, Any] = {}

    def _on_send_error(self, exc: BaseException) -> None:
        with self._errors_lock:
            self.stats.produce_errors += 1
        self.metrics.produce_errors.inc()
        log.error("Kafka rejected a record: %s", exc)

    def dead_letter(self, raw: str, code: str, detail: str) -> None:
        value = {"source": "binance", "url": self.stats.url, "reason": code, "detail": detail, "raw": raw,
                 "received_at": datetime.now(timezone.utc).isoformat()}
        self.producer.send(self.config.dlq_topic, value=json.dumps(value).encode(),
                           headers=[("k2.reason", code.encode()), ("k2.source", b"binance")]
                           ).add_errback(self._on_send_error)
        self.stats.dead_lettered += 1
        self.stats.dead_letters_by_reason[code] = self.stats.dead_letters_by_reason.get(code, 0) + 1
        self.metrics.dead_lettered.labels(code).inc()

    def handle(self, raw: str) -> None:
        self.stats.received += 1
        self.metrics.received.inc()
        try:
            record = normalise_trade(raw)
        except MalformedTradeMessage as exc:
            self.dead_letter(raw, exc.code, exc.detail)
            return
        symbol = record["symbol"]
        verdict, missing = self.tracker.observe(symbol, record["source_sequence"])
        if verdict == TrackVerdict.DUPLICATE:
            self.stats.duplicates += 1
            if symbol not in self._dupes:
                self._dupes[symbol] = self.metrics.duplicates.labels(symbol)
            self._dupes[symbol].inc()
            return
        if missing:
            self.stats.gaps += 1
            self.stats.missing_ids += missing
            self.metrics.gaps.labels(symbol).inc()
            self.metrics.missing.labels(symbol).inc(missing)
        try:
            value = encode_trade(record)
        except SchemaMismatchError as exc:
            self.dead_letter(raw, "schema_mismatch", str(exc))
            return
        self.producer.send(self.config.topic, key=symbol.encode(), value=value).add_errback(self._on_send_error)
        self.stats.produced += 1
        self.stats.produced_by_symbol[symbol] = self.stats.produced_by_symbol.get(symbol, 0) + 1
        if symbol not in self._produced:
            self._produced[symbol] = self.metrics.produced.labels(symbol)
        self._produced[symbol].inc()
        event_ms = record["vendor_data"].get("E")
        event_s = int(event_ms) / 1000 if event_ms and event_ms.isdigit() else record["timestamp"].timestamp()
        self.metrics.delay.observe(max(0.0, time.time() - event_s))

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


async def run_streamer(
    config: StreamerConfig,
    kafka: KafkaResource | None = None,
    *,
    max_messages: int | None = None,
    stop_event: StopSignal | None = None,
    idle_timeout_s: float | None = None,
    metrics: StreamMetrics | None = None,
) -> StreamStats:
    """Stream until the source ends the stream (end of the recording), a stop, idle_timeout_s without
    frames, or max_messages frames received; flushes the producer before it returns."""
    metrics = metrics or StreamMetrics()
    own_metrics_server = config.metrics_port is not None and metrics.port is None
    if own_metrics_server:
        metrics.serve(config.metrics_port)  # type: ignore[arg-type]
    started = time.monotonic()

    def count_reconnects(event: str) -> None:
        if event == "reconnect":
            metrics.reconnects.inc()

    client = BinanceStreamClient(
        url=config.stream_url, backoff_initial_s=config.backoff_initial_s, backoff_max_s=config.backoff_max_s,
        backoff_jitter=config.backoff_jitter, max_connection_age_s=config.max_connection_age_s,
        idle_timeout_s=idle_timeout_s, stop_event=stop_event, on_event=count_reconnects,
    )
    pipeline: _Pipeline | None = None
    try:
        pipeline = _Pipeline(config, kafka or KafkaResource(), metrics)
        async with contextlib.aclosing(client.frames()) as frames:
            async for raw in frames:
                pipeline.handle(raw)
                if max_messages is not None and pipeline.stats.received >= max_messages:
                    client.stats.ended_by = "max_messages"
                    break
    finally:
        if pipeline is not None:
            pipeline.close()
        if own_metrics_server:
            metrics.close()
    stats = pipeline.stats
    stats.reconnects, stats.rotations = client.stats.reconnects, client.stats.rotations
    stats.ended_by = client.stats.ended_by
    stats.seconds = round(time.monotonic() - started, 3)
    return stats


async def run_with_local_recording(
    config: StreamerConfig,
    kafka: KafkaResource | None = None,
    *,
    speed: float | None = 1.0,
    loop: bool = True,
    **options: Any,
) -> StreamStats:
    """Stream from an in-process recording server of the bundled recording (the offline default).

    Looping playback uses the "now" time base, so trades carry current times and fresh trade ids.
    """
    server = RecordingServer(speed=speed, loop=loop, time_base="now" if loop else "recorded")
    async with server:
        local = StreamerConfig(**{**asdict(config), "url": server.base_url})
        return await run_streamer(local, kafka, **options)


def stream_to_kafka(
    url: str,
    topic: str = BINANCE_TRADES_TOPIC,
    kafka: KafkaResource | None = None,
    *,
    symbols: tuple[str, ...] | list[str] = DEFAULT_SYMBOLS,
    dlq_topic: str = BINANCE_TRADES_DLQ_TOPIC,
    partitions: int = DEFAULT_PARTITIONS,
    max_messages: int | None = None,
    stop_event: StopSignal | None = None,
    idle_timeout_s: float | None = None,
    metrics_port: int | None = None,
    metrics: StreamMetrics | None = None,
    backoff_initial_s: float = 1.0,
    backoff_max_s: float = 60.0,
    max_connection_age_s: float = BINANCE_MAX_CONNECTION_AGE_S - 1800,
) -> StreamStats:
    """Stream a Binance combined stream into Kafka; blocks until done.

    ``url`` is a full ``.../stream?streams=...`` URL (e.g. RecordingServerThread.url) or a base URL
    (``wss://stream.binance.com:9443``, ``RecordingServerThread.base_url``) that ``symbols`` complete.

    Returns when the server ends the stream (a once-only playback closes with 1000 "end of recording"),
    when stop_event (threading.Event) is set, after idle_timeout_s without frames, or after
    max_messages frames. Call from a thread that has no running asyncio loop.
    """
    config = StreamerConfig(url=url, symbols=tuple(s.upper() for s in symbols), topic=topic, dlq_topic=dlq_topic,
                            partitions=partitions, metrics_port=metrics_port, backoff_initial_s=backoff_initial_s,
                            backoff_max_s=backoff_max_s, max_connection_age_s=max_connection_age_s)
    return asyncio.run(run_streamer(config, kafka, max_messages=max_messages, stop_event=stop_event,
                                    idle_timeout_s=idle_timeout_s, metrics=metrics))
