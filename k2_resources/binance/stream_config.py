"""The streamer's settings: where it reads from and writes to, and how it keeps the stream whole."""

from __future__ import annotations

from dataclasses import dataclass, field

from k2_resources.binance.client import (
    BINANCE_MAX_CONNECTION_AGE_S,
    DEFAULT_SYMBOLS,
    LIVE_BASE_URL,
    combined_stream_url,
)
from k2_resources.binance.dedupe import DEFAULT_RESET_JUMP, DEFAULT_SEED_PER_PARTITION, DEFAULT_WINDOW
from k2_resources.binance.gap_plan import GapFillSettings
from k2_resources.binance.stream_metrics import DEFAULT_METRICS_PORT
from k2_resources.kafka.outbox import DEFAULT_MAX_BUFFERED
from k2_resources.kafka.topics import BINANCE_TRADES_DLQ_TOPIC, BINANCE_TRADES_PARTITIONS, BINANCE_TRADES_TOPIC
from k2_resources.platform.failover import CLOSE_TIMEOUT_S

DEFAULT_PARTITIONS = BINANCE_TRADES_PARTITIONS


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
    ping_interval_s: float | None = 20.0  # keepalive pings; None for a local server a slow reader lags behind
    spool_dir: str | None = None  # where records wait while Kafka is away; None: K2_HOME/spool
    max_buffered: int = DEFAULT_MAX_BUFFERED  # records per topic in memory awaiting Kafka's ack before spooling
    close_timeout_s: float = CLOSE_TIMEOUT_S  # at the end, how long to wait for Kafka (> a broker's failover)
    dedupe_window: int = DEFAULT_WINDOW  # trades remembered to recognise repeats
    reset_jump: int = DEFAULT_RESET_JUMP  # an id this far below the symbol's highest is a reset
    seed_per_partition: int = DEFAULT_SEED_PER_PARTITION  # topic tail read back at start (0: none)
    gap_fill: GapFillSettings = field(default_factory=GapFillSettings.from_env)  # see binance/gap_fill.py

    @property
    def stream_url(self) -> str:
        return combined_stream_url(self.url, self.symbols)
