"""The streamer's Prometheus metrics (a registry of its own, served on 127.0.0.1) and its run totals.

The metrics themselves are defined in k2_resources.metrics (:class:`~k2_resources.metrics.StreamerMetrics`,
one place for every K2 metric name); a StreamMetrics builds them on a registry of its own per run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from k2_resources.errors import K2Error
from k2_resources.metrics import STREAMER_DELAY_BUCKETS, STREAMER_EXPORTER_PORT, StreamerMetrics

DEFAULT_METRICS_PORT = STREAMER_EXPORTER_PORT
DELAY_BUCKETS = STREAMER_DELAY_BUCKETS


class StreamMetrics(StreamerMetrics):
    """The streamer's metrics in a registry of their own, and the /metrics server that serves them."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry())
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
    ids_absent: int = 0  # trade ids of gaps the exchange's history does not hold (not a loss)
    gaps_resumed: int = 0  # open gaps a previous run left in the ledger, filled again by this one
    ended_by: str | None = None
    seconds: float = 0.0
    produced_by_symbol: dict[str, int] = field(default_factory=dict)
    dead_letters_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
