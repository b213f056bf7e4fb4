"""Prometheus metrics of the query API, served at its own ``/metrics``.

Defined with every K2 metric in :mod:`k2_resources.metrics`; the API serves only its own
(``API_REGISTRY``, a view of them), so a scrape of it does not report the stream sensor's or the
exporter's gauges (lag, degradation level) as zeros next to the real values ``k2 metrics`` serves.
"""

from __future__ import annotations

from k2_resources.metrics import (
    API_IN_FLIGHT,
    API_RATE_LIMITED,
    API_REQUEST_SECONDS,
    API_REQUESTS,
    API_ROWS,
    API_SHARED_READS,
)
from k2_resources.metrics import API_METRICS as API_REGISTRY

__all__ = [
    "API_IN_FLIGHT",
    "API_RATE_LIMITED",
    "API_REGISTRY",
    "API_REQUESTS",
    "API_REQUEST_SECONDS",
    "API_ROWS",
    "API_SHARED_READS",
]
