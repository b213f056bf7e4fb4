"""The Binance producer pipeline: WebSocket client -> normaliser -> trade-id tracker -> Kafka.

Trades go to ``market.trades.binance`` as framed Avro trade V2 records (k2_resources.schemas),
keyed by symbol (so each symbol stays in order in one partition), through the idempotent
producer of KafkaResource (acks=all).

Accept, then change state (FramePipeline): every frame ends as exactly one of produced,
duplicate or dead letter, and nothing is remembered or counted as produced until the trade has
been validated, encoded and handed to the producer. Repeats are recognised by (symbol, trade id,
trade time) in a bounded window (k2_resources.binance.dedupe), which is seeded at start from the
tail of each partition of the topic, so a crash and restart does not produce a trade twice when
the source resends it. Ids that fall back far below a symbol's highest (a reset or relisting at
the source) are kept, counted in ``k2_binance_trade_id_resets_total`` (alert
K2BinanceTradeIdReset) and logged at WARNING with both ids.

Dead letters: a frame that is not a valid trade goes to ``market.trades.binance.dlq`` and the
stream goes on, in K2's one dead-letter contract (k2_resources.kafka.dead_letters: the frame as
received as the value, stage ``stream``, source ``binance`` and the stream url in headers).
Reason codes are those of MalformedTradeMessage (invalid_json, missing_field, bad_number,
unexpected_event, ...) plus schema_mismatch (does not encode), invalid_utf8 (a binary frame that
is not text), too_large (the encoded trade exceeds what a Kafka record may hold) and
produce_rejected (the producer refused the record).

Metrics: k2_resources.binance.stream_metrics. Gaps in a symbol's trade ids are filled from
Binance's REST history beside the live stream (k2_resources.binance.gap_fill).

Kafka away: the producer the pipeline hands records to is a SpoolingKafkaProducer
(k2_resources/kafka/spool.py): at most ``max_buffered`` records per topic wait in memory for the
broker's acknowledgement; past that every record is appended to the spool
``K2_HOME/spool/<topic>/`` and replayed into Kafka in order when the broker is back; nothing is
dropped. ``k2_binance_spooled_frames_total{topic}`` counts the records that went to the spool;
``k2_binance_buffered_frames`` and ``k2_binance_spool_pending_frames`` show what waits in memory
and on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from k2_resources.binance.client import (
    BINANCE_MAX_CONNECTION_AGE_S,
    DEFAULT_SYMBOLS,
    BinanceStreamClient,
    StopSignal,
)
from k2_resources.binance.dedupe import (
    Classification,
    TradeIdTracker,
    TradeIdVerdict,
    seed_from_spool,
    seed_from_topic,
    trade_time_ms,
)
from k2_resources.binance.gap_fill import GapFiller
from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.binance.gap_plan import rest_base_url
from k2_resources.binance.normalise import MalformedTradeMessage, normalise_trade
from k2_resources.binance.recording_server import RecordingServer
from k2_resources.binance.stream_config import DEFAULT_PARTITIONS, StreamerConfig
from k2_resources.binance.stream_metrics import DEFAULT_METRICS_PORT, StreamMetrics, StreamStats
from k2_resources.errors import SchemaMismatchError
from k2_resources.kafka.dead_letters import STREAM, dead_letter, send_dead_letter
from k2_resources.kafka.outbox import SPOOLING_PRODUCER_SETTINGS
from k2_resources.kafka.partitioner import SymbolPartitioner
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import STREAMER
from k2_resources.kafka.spool import SpoolingKafkaProducer
from k2_resources.kafka.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_TOPIC
from k2_resources.paths import state_dir
from k2_resources.schemas import encode_trade

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_METRICS_PORT",
    "DEFAULT_PARTITIONS",
    "StreamMetrics",
    "StreamStats",
    "StreamerConfig",
]  # re-exported: the CLI and tests import them here


class FrameOutcome:
    """What became of one frame: each frame ends as exactly one of these."""

    PRODUCED = "produced"
    DUPLICATE = "duplicate"
    DEAD_LETTER = "dead_letter"


class FramePipeline:
    """One frame at a time: normalise -> duplicate check -> encode -> hand to the producer.

    Accept, then change state: the duplicate window, the gap and reset counts and the
    produced-data metrics change only once the trade has been validated, encoded and handed to
    the producer. A frame that fails any step goes to the dead-letter topic with its reason and
    changes nothing else, so one bad frame can never make later good ones look like duplicates.
    ``handle`` never raises for anything a WebSocket can deliver.
    """

    def __init__(
        self, config: StreamerConfig, producer: Any, metrics: StreamMetrics, tracker: TradeIdTracker | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.stats = StreamStats(url=config.stream_url, topic=config.topic, dlq_topic=config.dlq_topic)
        self.tracker = tracker or TradeIdTracker(window=config.dedupe_window, reset_jump=config.reset_jump)
        self.producer = producer
        self.on_gap: Callable[[str, int, int], None] | None = None  # (symbol, first, last missing id)
        self.on_reset: Callable[[str, int, int], None] | None = None  # (symbol, previous high, new id)
        self._errors_lock = threading.Lock()
        self._produced: dict[str, Any] = {}  # symbol -> its child of the produced counter
        self._dupes: dict[str, Any] = {}
        for symbol in config.symbols:  # series at 0 from the start, so the first reset shows as an increase
            metrics.resets.labels(symbol.upper())

    def _on_send_error(self, exc: BaseException) -> None:
        with self._errors_lock:
            self.stats.produce_errors += 1
        self.metrics.produce_errors.inc()
        log.error("Kafka rejected a record: %s", exc)

    def dead_letter(self, raw: str | bytes, code: str, detail: str) -> str:
        letter = dead_letter(raw, code, detail, STREAM, source="binance", url=self.stats.url)
        send_dead_letter(self.producer, self.config.dlq_topic, letter).add_errback(self._on_send_error)
        self.stats.dead_lettered += 1
        self.stats.dead_letters_by_reason[code] = self.stats.dead_letters_by_reason.get(code, 0) + 1
        self.metrics.dead_lettered.labels(code).inc()
        return FrameOutcome.DEAD_LETTER

    def handle(self, raw: str | bytes) -> str:
        """Produce, drop as a duplicate or dead-letter one frame; returns which (a FrameOutcome)."""
        self.stats.received += 1
        self.metrics.received.inc()
        if isinstance(raw, bytes):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                return self.dead_letter(raw, "invalid_utf8", f"binary frame is not UTF-8 text ({exc})")
        else:
            text = raw
        try:
            record = normalise_trade(text)
        except MalformedTradeMessage as exc:
            return self.dead_letter(raw, exc.code, exc.detail)
        return self._produce(raw, record, backfilled=False)

    def handle_backfilled(self, message: dict[str, Any]) -> str:
        """One trade from the REST history (a trade message with ``backfilled`` set): the same steps
        as a frame, but it never opens a gap, counts as late or reset, or moves the id high-water mark
        down (see TradeIdTracker.accept)."""
        raw = json.dumps(message, separators=(",", ":"))
        try:
            record = normalise_trade(message)
        except MalformedTradeMessage as exc:
            return self.dead_letter(raw, exc.code, exc.detail)
        return self._produce(raw, record, backfilled=True)

    def _produce(self, raw: str | bytes, record: dict[str, Any], *, backfilled: bool) -> str:
        symbol, trade_id = record["symbol"], record["source_sequence"]
        time_ms = trade_time_ms(record["timestamp"])
        seen = self.tracker.classify(symbol, trade_id, time_ms)
        if seen.verdict == TradeIdVerdict.DUPLICATE:
            self.stats.duplicates += 1
            if symbol not in self._dupes:
                self._dupes[symbol] = self.metrics.duplicates.labels(symbol)
            self._dupes[symbol].inc()
            return FrameOutcome.DUPLICATE
        try:
            value = encode_trade(record)
        except SchemaMismatchError as exc:
            return self.dead_letter(raw, "schema_mismatch", str(exc))
        if len(value) > MAX_RECORD_BYTES:
            return self.dead_letter(
                raw,
                "too_large",
                f"the encoded trade is {len(value)} bytes, above the {MAX_RECORD_BYTES} bytes a Kafka record may take",
            )
        future = self.producer.send(self.config.topic, key=symbol.encode(), value=value)
        if getattr(future, "is_done", False) and future.failed():  # refused before it was queued (too large)
            return self.dead_letter(
                raw,
                "produce_rejected",
                f"the Kafka producer refused the record ({future.exception}); nothing else changed",
            )
        future.add_errback(self._on_send_error)
        if backfilled:
            self._accepted_backfill(record)
        else:
            self._accepted(record, seen)
        return FrameOutcome.PRODUCED

    def _accepted_backfill(self, record: dict[str, Any]) -> None:
        symbol = record["symbol"]
        self.tracker.accept(symbol, record["source_sequence"], trade_time_ms(record["timestamp"]), backfilled=True)
        self.stats.backfilled += 1
        self.metrics.backfilled.labels(symbol).inc()
        self._count_produced(symbol)

    def _accepted(self, record: dict[str, Any], seen: Classification) -> None:
        """The trade was handed to the producer: only now remember it and count it."""
        symbol, trade_id = record["symbol"], record["source_sequence"]
        self.tracker.accept(symbol, trade_id, trade_time_ms(record["timestamp"]))
        if seen.missing:
            self.stats.gaps += 1
            self.stats.missing_ids += seen.missing
            self.metrics.gaps.labels(symbol).inc()
            self.metrics.missing.labels(symbol).inc(seen.missing)
            if self.on_gap is not None and seen.previous_high is not None:
                self.on_gap(symbol, seen.previous_high + 1, trade_id - 1)
        elif seen.verdict == TradeIdVerdict.LATE:
            self.stats.late += 1
            self.metrics.late.labels(symbol).inc()
        elif seen.verdict == TradeIdVerdict.RESET:
            self.stats.resets += 1
            self.metrics.resets.labels(symbol).inc()
            log.warning(
                "trade id reset on %s: trade id %d arrived after %d (more than %d below it); "
                "taken as an id reset or relisting at the source, trade kept",
                symbol,
                trade_id,
                seen.previous_high,
                self.tracker.reset_jump,
            )
            if self.on_reset is not None and seen.previous_high is not None:
                self.on_reset(symbol, seen.previous_high, trade_id)
        self._count_produced(symbol)
        self.metrics.delay.observe(max(0.0, time.time() - _event_seconds(record)))

    def _count_produced(self, symbol: str) -> None:
        self.stats.produced += 1
        self.stats.produced_by_symbol[symbol] = self.stats.produced_by_symbol.get(symbol, 0) + 1
        if symbol not in self._produced:
            self._produced[symbol] = self.metrics.produced.labels(symbol)
        self._produced[symbol].inc()

    def close(self) -> None:
        self.producer.flush()
        self.producer.close()


MAX_RECORD_BYTES = 1_000_000  # KafkaProducer's max_request_size (1 MiB) less room for key and headers


def _event_seconds(record: dict[str, Any]) -> float:
    """Event time ``E`` in seconds when it is a plausible epoch-ms number, else the trade time."""
    event_ms = record["vendor_data"].get("E", "")
    if event_ms.isascii() and event_ms.isdigit() and len(event_ms) <= 15:
        return int(event_ms) / 1000
    return record["timestamp"].timestamp()


def spool_root(config: StreamerConfig) -> Path:
    """The folder holding one spool folder per topic."""
    return Path(config.spool_dir) if config.spool_dir else state_dir("spool")


def spooling_producer(config: StreamerConfig, kafka: KafkaResource, metrics: StreamMetrics) -> SpoolingKafkaProducer:
    """The idempotent producer behind a bounded window and a spool per topic (nothing dropped while Kafka is away)."""
    root = spool_root(config)
    # Keyed by symbol; the partitioner spreads the well-known symbols over the partitions.
    producer = SpoolingKafkaProducer(
        kafka.producer(partitioner=SymbolPartitioner(), **SPOOLING_PRODUCER_SETTINGS),
        root,
        max_buffered=config.max_buffered,
        close_timeout_s=config.close_timeout_s,
        topics=(config.topic, config.dlq_topic),
        on_spooled=lambda topic, count: metrics.spooled.labels(topic).inc(count),
    )
    metrics.buffered.set_function(producer.buffered)
    metrics.spool_pending.set_function(producer.spool_pending)
    return producer


def _start_pipeline(config: StreamerConfig, kafka: KafkaResource, metrics: StreamMetrics) -> FramePipeline:
    """Topics ensured, the duplicate check seeded from the topic's tail, the producer opened."""
    kafka.ensure_topic(config.topic, partitions=config.partitions)
    kafka.ensure_topic(config.dlq_topic, partitions=1)
    tracker = TradeIdTracker(window=config.dedupe_window, reset_jump=config.reset_jump)
    seeded = seed_from_topic(
        kafka, config.topic, tracker, per_partition=min(config.seed_per_partition, config.dedupe_window)
    )
    spooled = seed_from_spool(spool_root(config) / config.topic, tracker, limit=config.dedupe_window)
    if seeded.records or spooled:
        log.info(
            "duplicate check seeded with the last %d trades of %s (partition offsets %s) and %d spooled "
            "trades in %.2f s",
            seeded.records,
            config.topic,
            seeded.partitions,
            spooled,
            seeded.seconds,
        )
    pipeline = FramePipeline(config, spooling_producer(config, kafka, metrics), metrics, tracker)
    pipeline.stats.seeded = seeded.records + spooled
    return pipeline


def _start_gap_filler(config: StreamerConfig, pipeline: FramePipeline, metrics: StreamMetrics) -> GapFiller:
    """The gap filler wired to the pipeline, the gaps a previous run left open queued, its task started."""
    settings = config.gap_fill
    filler = GapFiller(
        settings,
        rest_base_url(config.stream_url, settings.rest_url),
        pipeline.handle_backfilled,
        pipeline.tracker.high_water_mark,
        GapLedger.for_topic(config.topic),
        metrics,
        pipeline.stats,
    )
    pipeline.on_gap, pipeline.on_reset = filler.gap, filler.reset
    if settings.enabled:
        filler.resume()
    filler.start()
    return filler


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
    frames, or max_messages frames received; flushes the producer before it returns.

    Before the first frame, the duplicate check is seeded from the tail of each partition of the
    topic (``config.seed_per_partition`` records), so trades a previous run produced are still
    recognised when the source resends them after a crash and restart."""
    metrics = metrics or StreamMetrics()
    own_metrics_server = config.metrics_port is not None and metrics.port is None
    if own_metrics_server:
        metrics.serve(config.metrics_port)  # type: ignore[arg-type]
    started = time.monotonic()

    def count_reconnects(event: str) -> None:
        if event == "reconnect":
            metrics.reconnects.inc()

    client = BinanceStreamClient(
        url=config.stream_url,
        backoff_initial_s=config.backoff_initial_s,
        backoff_max_s=config.backoff_max_s,
        backoff_jitter=config.backoff_jitter,
        max_connection_age_s=config.max_connection_age_s,
        ping_interval_s=config.ping_interval_s,
        idle_timeout_s=idle_timeout_s,
        stop_event=stop_event,
        on_event=count_reconnects,
    )
    pipeline: FramePipeline | None = None
    filler: GapFiller | None = None
    try:
        pipeline = _start_pipeline(config, kafka or KafkaResource(role=STREAMER), metrics)
        filler = _start_gap_filler(config, pipeline, metrics)
        async with contextlib.aclosing(client.frames()) as frames:
            async for raw in frames:
                pipeline.handle(raw)
                if pipeline.stats.received % 256 == 0:
                    await asyncio.sleep(0)  # a frame ready at once does not suspend: let the gap fill run
                if max_messages is not None and pipeline.stats.received >= max_messages:
                    client.stats.ended_by = "max_messages"
                    break
    finally:
        if filler is not None:
            await filler.close(config.gap_fill.drain_timeout_s)
        if pipeline is not None:
            pipeline.close()
        if own_metrics_server:
            metrics.close()
    stats = pipeline.stats
    if isinstance(pipeline.producer, SpoolingKafkaProducer):
        spool = pipeline.producer.totals()
        stats.spooled, stats.replayed, stats.undelivered = spool.spooled, spool.replayed, pipeline.producer.undelivered
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
        local = dataclasses.replace(config, url=server.base_url)
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
    ping_interval_s: float | None = 20.0,
) -> StreamStats:
    """Stream a Binance combined stream into Kafka; blocks until done.

    ``url`` is a full ``.../stream?streams=...`` URL (e.g. RecordingServerThread.url) or a base URL
    (``wss://stream.binance.com:9443``, ``RecordingServerThread.base_url``) that ``symbols`` complete.

    Returns when the server ends the stream (a once-only playback closes with 1000 "end of recording"),
    when stop_event (threading.Event) is set, after idle_timeout_s without frames, or after
    max_messages frames. Call from a thread that has no running asyncio loop.
    """
    config = StreamerConfig(
        url=url,
        symbols=tuple(s.upper() for s in symbols),
        topic=topic,
        dlq_topic=dlq_topic,
        partitions=partitions,
        metrics_port=metrics_port,
        backoff_initial_s=backoff_initial_s,
        backoff_max_s=backoff_max_s,
        max_connection_age_s=max_connection_age_s,
        ping_interval_s=ping_interval_s,
    )
    return asyncio.run(
        run_streamer(
            config,
            kafka,
            max_messages=max_messages,
            stop_event=stop_event,
            idle_timeout_s=idle_timeout_s,
            metrics=metrics,
        )
    )
