"""The K2 HTTP query API (FastAPI): ``create_app()`` builds it, ``k2 api`` serves it with uvicorn.

``app`` builds the routes; ``keys`` stores API keys hashed; ``limits`` is the per-key token
bucket; ``formats`` renders JSON, CSV and Arrow IPC and encodes page cursors; ``health``
probes the catalog and Kafka; ``metrics`` holds the API's Prometheus series.
"""

from k2_resources.api.app import DEFAULT_API_PORT, ApiSettings, create_app
from k2_resources.api.keys import KeyFile, KeyStore

__all__ = ["DEFAULT_API_PORT", "ApiSettings", "KeyFile", "KeyStore", "create_app"]
