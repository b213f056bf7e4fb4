"""Settings of the query API; every one has a default that works without configuration."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field

from k2_resources.errors import K2Error
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC

DEFAULT_API_PORT = 8000


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise K2Error(f"{name}={raw!r} is not a number; unset it or give e.g. {default:g}") from exc


def topic_exchanges_from_environment() -> dict[str, list[str]]:
    """$K2_API_TOPIC_EXCHANGES (``topic=EXCHANGE`` pairs, comma-separated; repeat a topic for more
    exchanges), else the Binance topic carrying BINANCE."""
    raw = os.environ.get("K2_API_TOPIC_EXCHANGES", "").strip()
    if not raw:
        return {BINANCE_TRADES_TOPIC: ["BINANCE"]}
    found: dict[str, list[str]] = {}
    for pair in raw.split(","):
        topic, equals, exchange = pair.partition("=")
        if not equals or not topic.strip() or not exchange.strip():
            raise K2Error(
                f"K2_API_TOPIC_EXCHANGES={raw!r}: {pair.strip()!r} is not topic=EXCHANGE; give e.g. "
                f"{BINANCE_TRADES_TOPIC}=BINANCE (comma-separated pairs) or unset it"
            )
        found.setdefault(topic.strip(), []).append(exchange.strip().upper())
    return found


class ApiSettings(BaseModel):
    """Settings of the query API; every one has a default that works without configuration."""

    keys_file: str | None = Field(
        default=None, description="API keys file; default $K2_API_KEYS_FILE or K2_HOME/api/keys.json"
    )
    bootstrap_key: str | None = Field(
        default_factory=lambda: os.environ.get("K2_API_KEY") or None,
        description="one key with every scope, from $K2_API_KEY",
    )
    rate_per_second: float = Field(
        default_factory=lambda: _env_float("K2_API_RATE_PER_SECOND", 20.0),
        gt=0,
        description="requests per second per key (token refill rate)",
    )
    burst: float = Field(
        default_factory=lambda: _env_float("K2_API_BURST", 40.0),
        ge=1,
        description="requests a key may make at once (bucket size)",
    )
    audit_file: str | None = Field(
        default=None, description="the audit log; default $K2_API_AUDIT_FILE or K2_HOME/api/audit.log"
    )
    tls_certfile: str | None = Field(
        default_factory=lambda: os.environ.get("K2_API_TLS_CERT") or None,
        description="PEM certificate (chain) to serve HTTPS with ($K2_API_TLS_CERT); with tls_keyfile",
    )
    tls_keyfile: str | None = Field(
        default_factory=lambda: os.environ.get("K2_API_TLS_KEY") or None,
        description="its PEM private key ($K2_API_TLS_KEY; keep it 0600)",
    )
    cache_megabytes: float = Field(
        default_factory=lambda: _env_float("K2_API_CACHE_MB", 512.0),
        gt=0,
        description="memory for rows of immutable data files kept between queries ($K2_API_CACHE_MB)",
    )
    max_in_flight: int = Field(
        default_factory=lambda: int(_env_float("K2_API_MAX_IN_FLIGHT", 64)),
        ge=1,
        description="data requests answered at once; more get 503 with Retry-After ($K2_API_MAX_IN_FLIGHT)",
    )
    bench_route: bool = Field(
        default_factory=lambda: os.environ.get("K2_API_BENCH_ROUTE", "") in ("1", "true", "yes"),
        description="serve /v1/_bench/bytes, pre-encoded bytes: the benchmark's baseline ($K2_API_BENCH_ROUTE=1)",
    )
    default_page_rows: int = Field(default=1000, ge=1)
    max_page_rows: int = Field(default=50_000, ge=1)
    max_recent_minutes: float = Field(default=1440.0, gt=0)
    topics: list[str] = Field(
        default_factory=lambda: [
            t.strip() for t in os.environ.get("K2_API_TOPICS", BINANCE_TRADES_TOPIC).split(",") if t.strip()
        ],
        description="Kafka topics whose tails the hybrid reads and whose lag health reports "
        "($K2_API_TOPICS, comma-separated; default market.trades.binance)",
    )
    topic_exchanges: dict[str, list[str]] = Field(
        default_factory=topic_exchanges_from_environment,
        description="the exchanges each topic carries: a window of another exchange, or one ending a day "
        "before the topic's newest committed trade, skips that tail ($K2_API_TOPIC_EXCHANGES, "
        "topic=EXCHANGE pairs; topics not named are always read)",
    )
