"""TradeSinkResource: how the Kafka -> Iceberg trade sink is tuned."""

from __future__ import annotations

import os

from dagster import ConfigurableResource
from pydantic import Field

from k2_resources import thresholds
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.follow import REPORT_SECONDS


class TradeSinkResource(ConfigurableResource):
    """Topic, batch size and lag thresholds of the stream sensor and its micro-batches."""

    topic: str = Field(default=BINANCE_TRADES_TOPIC, description="Kafka topic of trade V2 records")
    max_batch_messages: int = Field(default=50_000, description="largest offset range one run reads")
    lag_warn_messages: int = Field(
        default=thresholds.LAG_WARN_MESSAGES,
        description="consumer lag at which the check turns WARN (default: the SOFT degradation trigger)",
    )
    lag_error_messages: int = Field(
        default=thresholds.LAG_ERROR_MESSAGES,
        description="consumer lag at which the check turns ERROR (default: the AGGRESSIVE degradation trigger)",
    )
    run_retry_after_seconds: int = Field(
        default=300, description="re-request a batch whose run has not appeared or finished after this long"
    )
    follow_seconds: float = Field(
        default_factory=lambda: float(os.environ.get("K2_STREAM_FOLLOW_SECONDS", "0")),
        description="at NORMAL, run one long-running follower (k2_resources/sink/follow.py) for this long "
        "instead of a run per range, committing every follow_interval_seconds; 0: a run per range. "
        "`k2 run` sets K2_STREAM_FOLLOW_SECONDS=600: a run launch costs seconds, a follower pays it once",
    )
    follow_interval_seconds: float = Field(
        default_factory=lambda: float(os.environ.get("K2_STREAM_FOLLOW_INTERVAL_SECONDS", "1")),
        description="how often a follower commits each partition's new offsets",
    )
    follow_report_seconds: float = Field(
        default_factory=lambda: float(os.environ.get("K2_STREAM_FOLLOW_REPORT_SECONDS", str(REPORT_SECONDS))),
        description="how often a follower records its commits in Dagster: one materialisation of binance_trades "
        "per window with each partition's offset range (the per-commit detail is in the table's snapshots); "
        "the run's end closes the last window. Each event of the last 7 days costs the asset page "
        "(docs/operations.md, 'Dagster history of the stream')",
    )
