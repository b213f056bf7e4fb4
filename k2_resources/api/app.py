"""The K2 query API: trades (Iceberg plus the Kafka tail), OHLCV bars, symbols, health, metrics.

``create_app()`` builds a FastAPI application from the environment (see :class:`ApiSettings`);
``k2 api`` serves it with uvicorn on 127.0.0.1:8000. Trades come from
:class:`~k2_resources.trades.hybrid.HybridQueryResource` (exact: the Iceberg snapshot below the
committed offsets, the Kafka log above them); bars and symbol statistics from DuckDB over the
Iceberg tables, with every value a bound parameter.

Every data route needs an API key (``X-API-Key: <key>`` or ``Authorization: Bearer <key>``) or a
bearer JWT from the identity provider (``tokens``, when K2_API_JWT_JWKS is set) with the route's
scope, and takes a token from the caller's bucket; ``/v1/health``, ``/metrics`` and the OpenAPI
pages (``/docs``, ``/openapi.json``) are open, for probes and scrapers. Every request, allowed or
refused, gets one line in the audit log (``audit``). TLS is uvicorn's (``k2 api`` with
K2_API_TLS_CERT and K2_API_TLS_KEY).

Pages: rows are ordered by (timestamp, message_id) for trades and (bucket_start, symbol,
exchange) for bars; a page has at most ``limit`` rows and, when more follow, a cursor holding
the last row's key. The next page is the rows strictly after that key, so pages neither repeat
nor skip a row the query can see. (A trade that arrives later with an older timestamp than
the cursor's is, like in any keyset pagination, not on a later page: pass ``as_of`` to page
through one fixed Iceberg snapshot.)
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from k2_resources.api.admission import AdmissionMiddleware
from k2_resources.api.audit import AuditLog
from k2_resources.api.handlers import install_error_handlers
from k2_resources.api.keys import KeyStore, default_keys_file
from k2_resources.api.middleware import MetricsMiddleware
from k2_resources.api.routers import bench, operations, reference
from k2_resources.api.routers.bars import bars_router
from k2_resources.api.routers.stream import router as stream_router
from k2_resources.api.routers.trades import trades_router
from k2_resources.api.services import Services
from k2_resources.api.settings import DEFAULT_API_PORT, ApiSettings
from k2_resources.api.tokens import TokenSettings, TokenVerifier
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import API
from k2_resources.trades.hybrid import HybridQueryResource

__all__ = ["DEFAULT_API_PORT", "ApiSettings", "create_app"]

_DESCRIPTION = (
    "Send an API key as `X-API-Key` (create one with `k2 api keys create`), or a JWT from the identity "
    "provider as `Authorization: Bearer <token>` where the API is configured for them. Responses are JSON "
    "by default; `Accept: text/csv` or `Accept: application/vnd.apache.arrow.stream` switch the "
    "format. Large results come in pages: pass the `next_cursor` of one page as `cursor` to get "
    "the next (CSV and Arrow carry it in the `X-Next-Cursor` header)."
)


def create_app(
    settings: ApiSettings | None = None,
    hybrid: HybridQueryResource | None = None,
    keys: KeyStore | None = None,
    tokens: TokenVerifier | None = None,
    audit: AuditLog | None = None,
) -> FastAPI:
    """The query API; settings, the hybrid resource, the key store, the token verifier and the audit
    log default to the environment's."""
    settings = settings or ApiSettings()
    tokens = tokens or TokenVerifier(TokenSettings.from_environment())  # bad settings stop the API here
    audit = audit or AuditLog(Path(settings.audit_file) if settings.audit_file else None)
    hybrid = hybrid or HybridQueryResource(
        topics=settings.topics, topic_exchanges=settings.topic_exchanges, kafka=KafkaResource(role=API)
    )
    keys = keys or KeyStore(
        Path(settings.keys_file) if settings.keys_file else default_keys_file(), settings.bootstrap_key
    )
    services = Services(settings, hybrid, keys, tokens, audit)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # Load DuckDB's extensions before serving, so the first bars or symbols request is not seconds slow.
        services.duckdb().close()
        yield
        services.close()

    app = FastAPI(
        lifespan=lifespan,
        title="K2 query API",
        version="1",
        summary="Trades (Iceberg plus the Kafka tail, exactly once), OHLCV bars, symbols and health of the K2 "
        "market-data lakehouse.",
        description=_DESCRIPTION,
    )
    app.state.k2 = services
    # Admission inside the metrics: a refused request is counted and audited like any other.
    app.add_middleware(AdmissionMiddleware, max_in_flight=settings.max_in_flight, level=services.health.current_level)
    app.add_middleware(MetricsMiddleware, audit=audit)
    install_error_handlers(app)
    app.include_router(trades_router(settings))
    app.include_router(stream_router)
    app.include_router(bars_router(settings))
    app.include_router(reference.router)
    app.include_router(operations.router)
    if settings.bench_route:
        app.include_router(bench.router)
    return app
