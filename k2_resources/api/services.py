"""What the API's routes share: the hybrid resource, DuckDB, keys, tokens, the audit log, limits, health, caches."""

from __future__ import annotations

import threading
from typing import Any

import duckdb
from fastapi import Request

from k2_resources.api.audit import AuditLog
from k2_resources.api.coalesce import Coalescer
from k2_resources.api.health import HealthProbe
from k2_resources.api.keys import KeyStore
from k2_resources.api.limits import TokenBucketLimiter
from k2_resources.api.pages import PageCache
from k2_resources.api.settings import ApiSettings
from k2_resources.api.summary import SymbolSummary
from k2_resources.api.tokens import TokenSettings, TokenVerifier
from k2_resources.catalog.resource import IcebergResource
from k2_resources.query.duckdb_query import connect_with_iceberg
from k2_resources.trades.hybrid import HybridQueryResource
from k2_resources.trades.live_tail import ServingReader

SYMBOLS_CACHE_ENTRIES = 16


class Services:
    """One per application (``app.state.k2``). Requests run on many threads at once: the hybrid's
    reads return their own stats, DuckDB gives each request a cursor of its own."""

    def __init__(
        self,
        settings: ApiSettings,
        hybrid: HybridQueryResource,
        keys: KeyStore,
        tokens: TokenVerifier | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.hybrid = hybrid
        # Trades reads of the routes: the hybrid's answers, from the caches of a long-lived process.
        self.serving = ServingReader(hybrid, int(settings.cache_megabytes * 1024 * 1024))
        self.pages = PageCache()  # rendered /v1/trades pages by data version
        self.coalescer = Coalescer()  # identical concurrent trades requests share one read
        self.symbol_summary = SymbolSummary(self.serving.snapshot_reader())
        self.iceberg: IcebergResource = hybrid.iceberg
        self.keys = keys
        self.tokens = tokens or TokenVerifier(TokenSettings.from_environment())
        self.audit = audit or AuditLog()
        self.limiter = TokenBucketLimiter(settings.rate_per_second, settings.burst)
        self.health = HealthProbe(hybrid.kafka, hybrid.iceberg, hybrid.topics)
        self._duckdb: duckdb.DuckDBPyConnection | None = None
        self._duckdb_lock = threading.Lock()
        self._symbols_cache: dict[tuple, Any] = {}

    def duckdb(self) -> duckdb.DuckDBPyConnection:
        """A DuckDB cursor of its own for this request (one database, extensions loaded once)."""
        with self._duckdb_lock:
            if self._duckdb is None:
                self._duckdb = connect_with_iceberg()
                self._duckdb.execute("SET threads = 2")
            cursor = self._duckdb.cursor()
        cursor.execute("SET TimeZone = 'UTC'")
        return cursor

    def cached_symbols(self, key: tuple) -> Any:
        return self._symbols_cache.get(key)

    def cache_symbols(self, key: tuple, rows: Any) -> None:
        """Keep ``rows`` first; the newest entries are kept (a snapshot's statistics never change)."""
        older = list(self._symbols_cache.items())[: SYMBOLS_CACHE_ENTRIES - 1]
        self._symbols_cache = {key: rows, **dict(older)}

    def close(self) -> None:
        self.audit.close()
        self.health.close()
        self.serving.close()
        self.hybrid.close()
        if self._duckdb is not None:
            self._duckdb.close()


def services_of(request: Request) -> Services:
    return request.app.state.k2
