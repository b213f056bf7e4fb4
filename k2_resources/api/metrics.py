"""Prometheus metrics of the query API, served at its own ``/metrics``.

They live on a registry of the API's own, not on ``k2_resources.metrics.REGISTRY``: the API
process does not run the stream sensor or the exporter, and a scrape of it must not report
their gauges (lag, degradation level) as zeros next to the real values ``k2 metrics`` serves.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

API_REGISTRY = CollectorRegistry(auto_describe=True)

API_REQUESTS = Counter(
    "k2_api_requests_total",
    "Query API requests by route and HTTP status.",
    ["route", "status"],
    registry=API_REGISTRY,
)
API_REQUEST_SECONDS = Histogram(
    "k2_api_request_seconds",
    "Query API request time, from the request's arrival to the last byte sent, by route.",
    ["route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=API_REGISTRY,
)
API_RATE_LIMITED = Counter(
    "k2_api_rate_limited_total",
    "Requests refused with 429 because the key's token bucket was empty, by key id.",
    ["key_id"],
    registry=API_REGISTRY,
)
API_ROWS = Counter(
    "k2_api_rows_returned_total",
    "Rows returned by the query API, by route.",
    ["route"],
    registry=API_REGISTRY,
)
