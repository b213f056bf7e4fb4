"""The Prometheus metrics K2 exports, defined once so dashboards and alert rules share the names.

All metrics live on ``REGISTRY``, a registry of K2's own (not prometheus_client's global one),
so a process exports exactly K2's series and tests can read them back without interference; a
process that serves only some of them (the query API) serves a :class:`MetricsView`. The
streamer's metrics (:class:`StreamerMetrics`) are defined here too but built on a registry given
by each run (k2_resources.binance.stream_metrics.StreamMetrics makes one per run), so two
streamers in one process (tests) count apart and `k2 metrics` does not serve them as zeros.
The alert rules in ``infra/prometheus/rules/k2-alerts.yml`` refer to these names.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

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
MICROBATCH_MESSAGES = Counter(
    "k2_microbatch_messages_total",
    "Messages written to Iceberg by micro-batch runs.",
    registry=REGISTRY,
)

# Set by the exporter (k2_resources.operations.exporter) from what the platform recorded.
COMMITTED_MESSAGES = Gauge(
    "k2_iceberg_committed_offsets",
    "Sum over partitions of the Kafka offsets market.trades has committed; rate() of it is the sink's throughput.",
    ["topic"],
    registry=REGISTRY,
)
TOPIC_END_OFFSETS = Gauge(
    "k2_kafka_end_offsets",
    "Sum over partitions of the topic's end offsets; rate() of it is the input rate.",
    ["topic"],
    registry=REGISTRY,
)
EXPORTER_ERRORS = Gauge(
    "k2_exporter_last_poll_failed",
    "1 when the exporter's last poll of a source failed.",
    ["source"],
    registry=REGISTRY,
)

# The streamer's gap ledger (K2_HOME/binance/gaps/<topic>.jsonl, issue 25), read by the exporter: the
# state the sequence_gaps check reports, as gauges. Unfilled gaps count until an operator accepts them
# (`k2 offsets gaps --accept`), so an alert on them holds until someone looked.
GAP_LEDGER_GAPS = Gauge(
    "k2_binance_ledger_gaps",
    "Trade-id gaps in the streamer's gap ledger by state (filled, unfilled, filling, absent_at_source) and, "
    "for unfilled ones, reason; unfilled gaps count until accepted with `k2 offsets gaps --accept`.",
    ["topic", "state", "reason"],
    registry=REGISTRY,
)
GAP_LEDGER_TRADE_IDS = Gauge(
    "k2_binance_ledger_trade_ids",
    "Trade ids of those gaps by state and reason: filled (fetched from the REST history), unfilled (never "
    "reached Kafka: lost), filling (a fill under way), absent_at_source (the exchange's history has no such ids).",
    ["topic", "state", "reason"],
    registry=REGISTRY,
)
GAP_LEDGER_RESETS = Gauge(
    "k2_binance_ledger_resets",
    "Trade-id resets in the gap ledger not yet accepted (reported, never filled).",
    ["topic"],
    registry=REGISTRY,
)

# K2's Iceberg tables (k2_resources.operations.table_metrics sets them; the Grafana dashboard
# infra/grafana/dashboards/k2.json plots them).
TABLE_RECORDS = Gauge("k2_iceberg_table_records", "Rows in the table's current snapshot.", ["table"], registry=REGISTRY)
TABLE_DATA_FILES = Gauge(
    "k2_iceberg_table_data_files", "Data files in the table's current snapshot.", ["table"], registry=REGISTRY
)
TABLE_DATA_BYTES = Gauge(
    "k2_iceberg_table_data_bytes", "Bytes of the data files in the current snapshot.", ["table"], registry=REGISTRY
)
TABLE_SNAPSHOTS = Gauge(
    "k2_iceberg_table_snapshots", "Snapshots kept in the table's metadata (time travel).", ["table"], registry=REGISTRY
)
TABLE_MAX_FILES_PER_PARTITION = Gauge(
    "k2_iceberg_table_max_files_per_partition",
    "Data files in the table's fullest partition (compaction brings it down).",
    ["table"],
    registry=REGISTRY,
)

# The query API's metrics, served at the API's own /metrics through API_METRICS (below).
API_REQUESTS = Counter(
    "k2_api_requests_total",
    "Query API requests by route and HTTP status.",
    ["route", "status"],
    registry=REGISTRY,
)
API_REQUEST_SECONDS = Histogram(
    "k2_api_request_seconds",
    "Query API request time, from the request's arrival to the last byte sent, by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
API_RATE_LIMITED = Counter(
    "k2_api_rate_limited_total",
    "Requests refused with 429 because the key's token bucket was empty, by key id.",
    ["key_id"],
    registry=REGISTRY,
)
API_ROWS = Counter(
    "k2_api_rows_returned_total",
    "Rows returned by the query API, by route.",
    ["route"],
    registry=REGISTRY,
)
API_IN_FLIGHT = Gauge(
    "k2_api_requests_in_flight",
    "Data requests the query API is answering now (admission refuses beyond K2_API_MAX_IN_FLIGHT).",
    registry=REGISTRY,
)
API_SHARED_READS = Counter(
    "k2_api_shared_reads_total",
    "Trades requests answered by a read another identical request started after they arrived, by route.",
    ["route"],
    registry=REGISTRY,
)
API_AUDIT_LINES = Counter(
    "k2_api_audit_lines_total",
    "Audit lines the query API wrote, by outcome (allowed, refused, failed) and credential (api_key, jwt, none).",
    ["outcome", "credential"],
    registry=REGISTRY,
)
API_AUDIT_WRITE_ERRORS = Counter(
    "k2_api_audit_write_errors_total",
    "Requests whose audit line could not be written (disk full, permissions): alert on any.",
    registry=REGISTRY,
)


class MetricsView:
    """Some of ``REGISTRY``'s metrics, collected in the order given: what one process serves.

    The API process does not run the stream sensor or the exporter, so a scrape of it must not
    report their gauges (lag, degradation level) as zeros next to the real values `k2 metrics`
    serves; it serves this view of the API's own metrics instead of the whole registry.
    """

    def __init__(self, *collectors: Collector) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            yield from collector.collect()


API_METRICS = MetricsView(
    API_REQUESTS,
    API_REQUEST_SECONDS,
    API_RATE_LIMITED,
    API_ROWS,
    API_IN_FLIGHT,
    API_SHARED_READS,
    API_AUDIT_LINES,
    API_AUDIT_WRITE_ERRORS,
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


# Table health and continuous maintenance (k2_resources/operations/continuous_maintenance.py; the
# bounds are in k2_resources/operations/table_health.py and docs/operations.md).
TABLE_HEALTH = Gauge(
    "k2_table_health",
    "A streamed table's health measure (manifests, snapshots, metadata_file_bytes, metadata_folder_bytes, "
    "max_settled_files_per_partition, data_files, data_bytes, oldest_time_travel_age_s).",
    ["table", "measure"],
    registry=REGISTRY,
)
TABLE_HEALTH_SEVERITY = Gauge(
    "k2_table_health_severity", "The table_health check's level: 0 OK, 1 WARN, 2 ERROR.", ["table"], registry=REGISTRY
)
MAINTENANCE_ACTIONS = Counter(
    "k2_maintenance_actions_total",
    "Continuous maintenance commits by action (compaction, expiry, orphans, properties).",
    ["table", "action"],
    registry=REGISTRY,
)
MAINTENANCE_FILES_REMOVED = Counter(
    "k2_maintenance_files_removed_total",
    "Files continuous maintenance took out of a table or deleted, by kind (data_rewritten, data_deleted, "
    "manifests, manifest_lists, orphans).",
    ["table", "kind"],
    registry=REGISTRY,
)
MAINTENANCE_CONFLICTS = Counter(
    "k2_maintenance_conflicts_total",
    "Maintenance commit attempts that lost to a concurrent commit and were retried.",
    ["table"],
    registry=REGISTRY,
)
MAINTENANCE_ERRORS = Counter(
    "k2_maintenance_errors_total", "Maintenance passes that failed (retried next pass).", ["table"], registry=REGISTRY
)
MAINTENANCE_PASS_SECONDS = Histogram(
    "k2_maintenance_pass_seconds", "Seconds one maintenance pass over one table took.", ["table"], registry=REGISTRY
)


# The Binance streamer's metrics (`k2 stream binance`, served on 127.0.0.1:9464). Built on a registry
# each run gives (see the module docstring); the alert rules and the Grafana dashboard use these names.
STREAMER_DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class StreamerMetrics:
    """The streamer's metrics, registered on ``registry``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = self.registry = registry
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
        self.resets = Counter(
            "k2_binance_trade_id_resets_total",
            "Binance trade ids that fell far below the symbol's highest (an id reset or relisting at the source); "
            "the trades are kept. Served by the streamer (`k2 stream binance`, port 9464).",
            ["symbol"],
            registry=r,
        )
        self.delay = Histogram(
            "k2_binance_event_to_produce_seconds",
            "event time E to hand-over to Kafka",
            buckets=STREAMER_DELAY_BUCKETS,
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
        self._gap_fill(r)

    def _gap_fill(self, r: CollectorRegistry) -> None:
        """Gap fill (issue 25): filled, unfilled and absent gaps, the REST requests and the open fills."""
        self.gaps_filled = Counter(
            "k2_binance_gaps_filled_total",
            "Trade-id gaps filled completely from the Binance REST history, by symbol.",
            ["symbol"],
            registry=r,
        )
        self.backfilled = Counter(
            "k2_binance_trades_backfilled_total",
            "Trades fetched from the Binance REST history and handed to Kafka (vendor_data backfilled=true), "
            "by symbol.",
            ["symbol"],
            registry=r,
        )
        self.gaps_unfilled = Counter(
            "k2_binance_gaps_unfilled_total",
            "Trade-id gaps reported as a loss (too large, refused, unreachable, timeout, not at source), "
            "by symbol and reason.",
            ["symbol", "reason"],
            registry=r,
        )
        self.ids_unfilled = Counter(
            "k2_binance_trade_ids_unfilled_total",
            "Trade ids of unfilled gaps that never reached Kafka (lost for good), by symbol and reason.",
            ["symbol", "reason"],
            registry=r,
        )
        self.ids_absent = Counter(
            "k2_binance_trade_ids_absent_at_source_total",
            "Trade ids of gaps the exchange's history does not hold (it answers with later ids): nothing to "
            "fill and not a loss, e.g. between two windows of a recording. By symbol.",
            ["symbol"],
            registry=r,
        )
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
