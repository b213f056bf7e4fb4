"""The streamer's Prometheus metrics (a registry of its own, served on 127.0.0.1) and its run totals.

The counters that alert rules or the K2 exporter name (trade-id resets, gap fill) are defined in
k2_resources.metrics and registered here too, so the streamer's /metrics serves them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from k2_resources.errors import K2Error
from k2_resources.metrics import (
    BINANCE_GAPS_FILLED,
    BINANCE_GAPS_UNFILLED,
    BINANCE_TRADE_ID_RESETS,
    BINANCE_TRADE_IDS_UNFILLED,
    BINANCE_TRADES_BACKFILLED,
)

DEFAULT_METRICS_PORT = 9464
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class StreamMetrics:
    """The streamer's Prometheus metrics in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter("k2_binance_messages_received", "WebSocket frames received", registry=r)
        self.produced = Counter(
            "k2_binance_trades_produced", "trades handed to the Kafka producer", ["symbol"], registry=r
        )
        self.dead_lettered = Counter(
            "k2_binance_dead_letters", "frames sent to the dead-letter topic", ["reason"], registry=r
        )
        self.duplicates = Counter(
            "k2_binance_duplicates_dropped", "trades dropped as already produced", ["symbol"], registry=r
        )
        self.reconnects = Counter(
            "k2_binance_reconnects", "WebSocket reconnects (incl. proactive 24 h ones)", registry=r
        )
        self.gaps = Counter(
            "k2_binance_trade_id_gaps", "jumps of more than one in a symbol's trade ids", ["symbol"], registry=r
        )
        self.missing = Counter(
            "k2_binance_missing_trade_ids", "trade ids skipped by those jumps", ["symbol"], registry=r
        )
        self.produce_errors = Counter(
            "k2_binance_produce_errors", "sends the Kafka producer reported failed", registry=r
        )
        self.late = Counter(
            "k2_binance_late_trades",
            "trades below the symbol's highest id, not seen before: kept",
            ["symbol"],
            registry=r,
        )
        # defined in k2_resources.metrics (the alert rules refer to it) and served here, by the streamer
        r.register(BINANCE_TRADE_ID_RESETS)
        self.resets = BINANCE_TRADE_ID_RESETS
        self.delay = Histogram(
            "k2_binance_event_to_produce_seconds",
            "event time E to hand-over to Kafka",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.spooled = Counter(
            "k2_binance_spooled_frames", "records written to the spool while Kafka was away", ["topic"], registry=r
        )
        self.buffered = Gauge(
            "k2_binance_buffered_frames", "records in memory awaiting Kafka's acknowledgement", registry=r
        )
        self.spool_pending = Gauge(
            "k2_binance_spool_pending_frames", "records in the spool not yet in Kafka", registry=r
        )
        # gap fill: the counters of k2_resources.metrics, plus the REST requests and the open fills
        for counter in (
            BINANCE_GAPS_FILLED,
            BINANCE_TRADES_BACKFILLED,
            BINANCE_GAPS_UNFILLED,
            BINANCE_TRADE_IDS_UNFILLED,
        ):
            r.register(counter)
        self.gaps_filled = BINANCE_GAPS_FILLED
        self.backfilled = BINANCE_TRADES_BACKFILLED
        self.gaps_unfilled = BINANCE_GAPS_UNFILLED
        self.ids_unfilled = BINANCE_TRADE_IDS_UNFILLED
        self.rest_requests = Counter(
            "k2_binance_rest_requests",
            "Binance REST history requests by endpoint and HTTP status",
            ["endpoint", "status"],
            registry=r,
        )
        self.rest_used_weight = Gauge(
            "k2_binance_rest_used_weight",
            "request weight used in the current window (X-MBX-USED-WEIGHT-1M)",
            registry=r,
        )
        self.gaps_filling = Gauge("k2_binance_gaps_filling", "trade-id gaps queued or being filled", registry=r)
        self._server: Any = None
        self.port: int | None = None

    def serve(self, port: int = DEFAULT_METRICS_PORT, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: a free port); returns the port."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise K2Error(
                f"cannot serve metrics on {host}:{port} ({exc}); pass another --metrics-port "
                "or stop the process using it"
            ) from exc
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
    spooled: int = 0  # records that waited in the spool on disk (Kafka away or not keeping up)
    replayed: int = 0  # spooled records sent to Kafka from the spool
    undelivered: int = 0  # records left in the spool at the end (sent first by the next run)
    late: int = 0  # trades below the symbol's highest id that were not seen before (kept)
    resets: int = 0  # trade-id resets (large backward jumps; kept and reported)
    seeded: int = 0  # trades read back from the topic's tail into the duplicate check at start
    backfilled: int = 0  # trades fetched from the REST history and handed to the producer (part of produced)
    gaps_filled: int = 0  # gaps filled completely from the REST history
    gaps_unfilled: int = 0  # gaps reported as a loss
    ids_unfilled: int = 0  # trade ids of those gaps that never reached Kafka
    gaps_resumed: int = 0  # open gaps a previous run left in the ledger, filled again by this one
    ended_by: str | None = None
    seconds: float = 0.0
    produced_by_symbol: dict[str, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
