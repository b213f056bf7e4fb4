"""The K2 HTTP query API (FastAPI): ``create_app()`` builds it, ``k2 api`` serves it with uvicorn.

``app`` assembles the application from ``routers/`` (trades, bars, reference, operations);
``settings`` its configuration; ``services`` what the routes share; ``params`` parses query
parameters; ``auth`` checks keys, scopes and rate limits (``keys`` stores API keys hashed,
``limits`` is the per-key token bucket); ``responses`` and ``formats`` render JSON, CSV and
Arrow IPC and encode page cursors; ``errors`` and ``handlers`` map each error to its HTTP
status; ``health`` probes the catalog and Kafka; ``metrics`` and ``middleware`` hold and record
the API's Prometheus series.
"""

from k2_resources.api.app import DEFAULT_API_PORT, ApiSettings, create_app
from k2_resources.api.keys import KeyFile, KeyStore

__all__ = ["DEFAULT_API_PORT", "ApiSettings", "KeyFile", "KeyStore", "create_app"]
