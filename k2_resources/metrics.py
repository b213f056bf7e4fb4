"""The Prometheus metrics K2 exports, defined once so dashboards and alert rules share the names.

All metrics live on ``REGISTRY``, a registry of K2's own (not prometheus_client's global one),
so a process exports exactly K2's series and tests can read them back without interference.
The alert rules in ``infra/prometheus/rules/k2-alerts.yml`` refer to these names.
"""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

# Ports infra/prometheus/prometheus.yml scrapes on 127.0.0.1.
K2_EXPORTER_PORT = 9465  # the Dagster code server (stream sensor, micro-batches)
STREAMER_EXPORTER_PORT = 9464  # `k2 stream binance`

CONSUMER_LAG = Gauge(
    "k2_consumer_lag_messages",
    "Messages in Kafka not yet committed to Iceberg (end offset minus committed offset).",
    ["topic", "partition"],
    registry=REGISTRY,
)
DEGRADATION_LEVEL = Gauge(
    "k2_degradation_level",
    "Current degradation level: 0 NORMAL, 1 SOFT, 2 GRACEFUL, 3 AGGRESSIVE, 4 CIRCUIT_BREAK.",
    registry=REGISTRY,
)
SHED_MESSAGES = Counter(
    "k2_shed_messages_total",
    "Messages deferred by load shedding (processed later, never dropped), by symbol.",
    ["symbol"],
    registry=REGISTRY,
)
DEFERRED_RANGES = Gauge(
    "k2_deferred_ranges",
    "Offset ranges deferred by load shedding and not yet committed to Iceberg.",
    registry=REGISTRY,
)
SPILLED_BATCHES = Gauge(
    "k2_spilled_batches",
    "Raw batches spilled to local Parquet under K2_HOME/spill and not yet committed to Iceberg.",
    registry=REGISTRY,
)
DEFERRED_ROWS = Gauge(
    "k2_deferred_rows",
    "Rows of deferred offset ranges not yet written to Iceberg (the deferred backlog).",
    registry=REGISTRY,
)
SPILLED_ROWS = Gauge(
    "k2_spilled_rows",
    "Rows of spilled batches not yet written to Iceberg (the spilled backlog).",
    registry=REGISTRY,
)
DEGRADATION_TRANSITIONS = Counter(
    "k2_degradation_transitions",
    "Changes of the degradation level reported by the stream sensor, by from and to level.",
    ["from_level", "to_level"],
    registry=REGISTRY,
)
DEAD_LETTERS = Counter(
    "k2_dead_letters_total",
    "Records sent to the dead-letter topic (with their reason), by source topic.",
    ["topic"],
    registry=REGISTRY,
)
ICEBERG_COMMIT_SECONDS = Histogram(
    "k2_iceberg_commit_seconds",
    "Wall time of one Iceberg commit of a micro-batch.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=REGISTRY,
)
BINANCE_TRADE_ID_RESETS = Counter(
    "k2_binance_trade_id_resets_total",
    "Binance trade ids that fell far below the symbol's highest (an id reset or relisting at the source); "
    "the trades are kept. Served by the streamer (`k2 stream binance`, port 9464).",
    ["symbol"],
    registry=REGISTRY,
)
MICROBATCH_MESSAGES = Counter(
    "k2_microbatch_messages_total",
    "Messages written to Iceberg by micro-batch runs.",
    registry=REGISTRY,
)

_servers: dict[tuple[str, int], tuple[WSGIServer, threading.Thread]] = {}
_servers_lock = threading.Lock()


def serve_metrics(port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Serve ``REGISTRY`` at ``http://addr:port/metrics`` from a daemon thread; once per process and port.

    Calling it again for the same address returns the running server, so code that runs every
    sensor tick can call it without starting a second server.
    """
    with _servers_lock:
        existing = _servers.get((addr, port))
        if existing is not None:
            return existing[0]
        server, thread = start_http_server(port, addr=addr, registry=REGISTRY)
        _servers[(addr, port)] = (server, thread)
        return server


def stop_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Stop a server started by ``serve_metrics`` (tests, clean shutdown)."""
    with _servers_lock:
        entry = _servers.pop((addr, port), None)
    if entry is not None:
        server, thread = entry
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def metrics_text() -> str:
    """The current exposition text of ``REGISTRY`` (what a scrape would return)."""
    return generate_latest(REGISTRY).decode("utf-8")
