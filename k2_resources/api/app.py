"""The K2 query API: trades (Iceberg plus the Kafka tail), OHLCV bars, symbols, health, metrics.

``create_app()`` builds a FastAPI application from the environment (see :class:`ApiSettings`);
``k2 api`` serves it with uvicorn on 127.0.0.1:8000. Trades come from
:class:`~k2_resources.trades.hybrid.HybridQueryResource` (exact: the Iceberg snapshot below the
committed offsets, the Kafka log above them); bars and symbol statistics from DuckDB over the
Iceberg tables, with every value a bound parameter.

Every data route needs an API key (``X-API-Key: <key>`` or ``Authorization: Bearer <key>``) with
the route's scope, and takes a token from the key's bucket; ``/v1/health``, ``/metrics`` and
the OpenAPI pages (``/docs``, ``/openapi.json``) are open, for probes and scrapers.

Pages: rows are ordered by (timestamp, message_id) for trades and (bucket_start, symbol,
exchange) for bars; a page has at most ``limit`` rows and, when more follow, a cursor holding
the last row's key. The next page is the rows strictly after that key, so pages neither repeat
nor skip a row the query can see. (A trade that arrives later with an older timestamp than
the cursor's is, like in any keyset pagination, not on a later page: pass ``as_of`` to page
through one fixed Iceberg snapshot.)
"""

import os
import re
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import polars as pl
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2_resources.api.formats import (
    ARROW,
    CSV,
    JSON,
    BadCursor,
    Cursor,
    NotAcceptable,
    choose_media_type,
    query_fingerprint,
    render,
)
from k2_resources.api.health import HealthProbe
from k2_resources.api.keys import READ_OHLCV, READ_TRADES, ApiKey, KeyStore, default_keys_file
from k2_resources.api.limits import TokenBucketLimiter
from k2_resources.api.metrics import API_RATE_LIMITED, API_REGISTRY, API_REQUEST_SECONDS, API_REQUESTS, API_ROWS
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import OHLCV
from k2_resources.errors import K2Error, KafkaUnavailableError
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.query.duckdb_query import connect_with_iceberg
from k2_resources.trades.hybrid import HybridQueryResource

DEFAULT_API_PORT = 8000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,31}$")
_EXCHANGE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_WINDOW = re.compile(r"^(\d{1,6})(s|m|h|d)$")
_WINDOW_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
MAX_SYMBOLS = 100
_EXAMPLES = {"symbol": "symbol=BTCUSDT (repeat it, or separate symbols with commas, for several)"}


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise K2Error(f"{name}={raw!r} is not a number; unset it or give e.g. {default:g}") from exc


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


class ParameterError(ValueError):
    """A query parameter the API cannot use; answered with 422 naming it and the fix."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


class _Services:
    """What the routes share: the hybrid resource, DuckDB, keys, limits, health, caches."""

    def __init__(self, settings: ApiSettings, hybrid: HybridQueryResource, keys: KeyStore) -> None:
        self.settings = settings
        self.hybrid = hybrid
        self.iceberg: IcebergResource = hybrid.iceberg
        self.keys = keys
        self.limiter = TokenBucketLimiter(settings.rate_per_second, settings.burst)
        self.health = HealthProbe(hybrid.kafka, hybrid.iceberg, hybrid.topics)
        # allow_partial requests go to a resource of their own, one at a time, so that its last_stats
        # belong to that request and the response can name exactly the offsets it left out.
        self.partial_hybrid = type(hybrid)(**{name: getattr(hybrid, name) for name in type(hybrid).model_fields})
        self.partial_lock = threading.Lock()
        self._duckdb = None
        self._duckdb_lock = threading.Lock()
        self._symbols_cache: dict[tuple, Any] = {}

    def duckdb(self):
        """A DuckDB cursor of its own for this request (one database, extensions loaded once)."""
        with self._duckdb_lock:
            if self._duckdb is None:
                self._duckdb = connect_with_iceberg()
                self._duckdb.execute("SET threads = 2")
            cursor = self._duckdb.cursor()
        cursor.execute("SET TimeZone = 'UTC'")
        return cursor

    def read_trades(
        self, allow_partial: bool, read: Callable[[HybridQueryResource], pl.DataFrame]
    ) -> tuple[pl.DataFrame, dict[str, str]]:
        """Rows of ``read(hybrid)`` and, with ``allow_partial``, the Kafka offsets left out (topic -> ranges)."""
        if not allow_partial:
            return read(self.hybrid), {}
        with self.partial_lock:
            frame = read(self.partial_hybrid)
            stats = self.partial_hybrid.last_stats
            return frame, dict(stats.missing) if stats is not None else {}

    def close(self) -> None:
        self.health.close()
        self.hybrid.close()
        self.partial_hybrid.close()
        if self._duckdb is not None:
            self._duckdb.close()


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def parse_time(parameter: str, text: str | None) -> datetime | None:
    """An ISO 8601 time (``Z`` or an offset; none means UTC), or a ParameterError naming the fix."""
    if text is None or text == "":
        return None
    cleaned = text.strip()
    if "T" in cleaned and " " in cleaned:
        cleaned = cleaned.replace(" ", "+")  # an unencoded '+' of an offset arrives as a space
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ParameterError(parameter, f"{text!r} is not an ISO 8601 time; use e.g. 2024-08-09T00:05:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_symbols(values: list[str]) -> tuple[str, ...]:
    symbols: list[str] = []
    for value in values:
        for symbol in (s.strip() for s in value.split(",")):
            if not symbol:
                continue
            if not _SYMBOL.match(symbol):
                raise ParameterError(
                    "symbol",
                    f"{symbol!r} is not a symbol; use letters, digits and . _ : / - (up to 32), e.g. BTCUSDT or BHP",
                )
            if symbol not in symbols:
                symbols.append(symbol)
    if not symbols:
        raise ParameterError(
            "symbol",
            "give at least one symbol, e.g. symbol=BTCUSDT (repeat it or separate symbols with commas for several)",
        )
    if len(symbols) > MAX_SYMBOLS:
        raise ParameterError("symbol", f"{len(symbols)} symbols; ask for at most {MAX_SYMBOLS} per request")
    return tuple(symbols)


def parse_exchange(exchange: str | None) -> str | None:
    if exchange is None or exchange == "":
        return None
    if not _EXCHANGE.match(exchange):
        raise ParameterError("exchange", f"{exchange!r} is not an exchange name; use e.g. BINANCE or ASX")
    return exchange.upper()


def parse_window(text: str) -> timedelta:
    match = _WINDOW.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ParameterError(
            "window", f"{text!r} is not a window; use a positive whole number with s, m, h or d, e.g. 90m, 6h or 7d"
        )
    return timedelta(**{_WINDOW_UNITS[match.group(2)]: int(match.group(1))})


def check_order(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end <= start:
        raise ParameterError("end", f"end {end.isoformat()} is not after start {start.isoformat()}; swap them")


def _micros(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(value))


def _cursor(text: str | None, query: str, positions: int) -> Cursor | None:
    if not text:
        return None
    try:
        return Cursor.decode(text, query, positions)
    except BadCursor as exc:
        raise ParameterError("cursor", str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key from `k2 api keys create`")
_bearer = HTTPBearer(auto_error=False, description="the same API key as a bearer token")


class _ApiError(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def _services(request: Request) -> _Services:
    return request.app.state.k2


def require(scope: str):
    """A dependency: the request's key must be valid (401), hold ``scope`` (403) and have a token (429)."""

    def dependency(
        request: Request,
        header_key: Annotated[str | None, Security(_api_key_header)] = None,
        bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)] = None,
    ) -> ApiKey:
        services = _services(request)
        presented = header_key or (bearer.credentials if bearer else None)
        challenge = {"WWW-Authenticate": 'ApiKey header="X-API-Key"'}
        if not presented:
            raise _ApiError(
                401,
                "no API key; send it as the X-API-Key header (or Authorization: Bearer <key>); "
                "create one with `k2 api keys create --name <who> --scope " + scope + "`",
                challenge,
            )
        key = services.keys.authenticate(presented)
        if key is None:
            raise _ApiError(
                401,
                "the API key is unknown or revoked; check it, or create a new one with `k2 api keys create`",
                challenge,
            )
        if not key.allows(scope):
            raise _ApiError(
                403,
                f"API key {key.id} ({key.name}) lacks the scope {scope} this route needs (it has "
                f"{', '.join(key.scopes)}); create a key with --scope {scope}",
            )
        decision = services.limiter.take(key.id, key.rate_per_second, key.burst)
        request.state.rate = decision
        if not decision.allowed:
            API_RATE_LIMITED.labels(key_id=key.id).inc()
            raise _ApiError(
                429,
                f"rate limit of {decision.limit:g} requests/s (burst {decision.burst:g}) reached "
                f"for API key {key.id}; retry after {decision.retry_after_header} s",
                {"Retry-After": decision.retry_after_header, **_rate_headers(decision)},
            )
        return key

    return dependency


def _rate_headers(decision) -> dict[str, str]:
    return {
        "X-RateLimit-Limit": f"{decision.limit:g}",
        "X-RateLimit-Burst": f"{decision.burst:g}",
        "X-RateLimit-Remaining": str(decision.remaining),
    }


def _respond(
    request: Request,
    rows,
    route: str,
    next_cursor: str | None = None,
    envelope: dict[str, Any] | None = None,
    missing: dict[str, str] | None = None,
) -> Response:
    """Rows in the negotiated format with rate, cursor and (for a partial answer) missing-offsets headers."""
    media_type = choose_media_type(request.headers.get("accept"))
    headers: dict[str, str] = {}
    if missing:
        # Kafka was down and the client asked for allow_partial: say which offsets are not in the rows.
        headers["X-K2-Partial"] = "; ".join(ranges for _, ranges in sorted(missing.items()))
        envelope = {**(envelope or {}), "partial": True, "missing_kafka_offsets": missing}
    decision = getattr(request.state, "rate", None)
    if decision is not None:
        headers.update(_rate_headers(decision))
    if next_cursor is not None:
        headers["X-Next-Cursor"] = next_cursor
        headers["Link"] = f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"'
    body = render(rows, media_type, {"next_cursor": next_cursor, **(envelope or {})} if media_type == JSON else None)
    API_ROWS.labels(route=route).inc(rows.height if hasattr(rows, "height") else rows.num_rows)
    return Response(
        content=body, media_type=media_type if media_type != CSV else "text/csv; charset=utf-8", headers=headers
    )


_PAGED = {
    200: {
        "description": "rows; JSON by default, CSV or Arrow IPC by the Accept header",
        "content": {JSON: {}, CSV: {}, ARROW: {}},
    },
    401: {"description": "no key, or an unknown or revoked key"},
    403: {"description": "the key lacks the route's scope"},
    406: {"description": "the Accept header names no format the API returns"},
    422: {"description": "a bad parameter, named with the fix"},
    429: {"description": "the key's rate limit; see Retry-After"},
    503: {"description": "Kafka or the catalog cannot answer"},
}


class _MetricsMiddleware:
    """Counts requests and times them by route template (pure ASGI: no per-request task overhead)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            API_REQUESTS.labels(route=route, status=str(status["code"])).inc()
            API_REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)


def create_app(
    settings: ApiSettings | None = None, hybrid: HybridQueryResource | None = None, keys: KeyStore | None = None
) -> FastAPI:
    """The query API; settings, the hybrid resource and the key store default to the environment's."""
    settings = settings or ApiSettings()
    hybrid = hybrid or HybridQueryResource(topics=settings.topics)
    keys = keys or KeyStore(
        Path(settings.keys_file) if settings.keys_file else default_keys_file(), settings.bootstrap_key
    )
    services = _Services(settings, hybrid, keys)

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
        description="Send an API key as `X-API-Key` (create one with `k2 api keys create`). Responses are JSON "
        "by default; `Accept: text/csv` or `Accept: application/vnd.apache.arrow.stream` switch the "
        "format. Large results come in pages: pass the `next_cursor` of one page as `cursor` to get "
        "the next (CSV and Arrow carry it in the `X-Next-Cursor` header).",
    )
    app.state.k2 = services
    app.add_middleware(_MetricsMiddleware)

    @app.exception_handler(_ApiError)
    async def _api_error(request: Request, exc: _ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(ParameterError)
    async def _parameter_error(request: Request, exc: ParameterError) -> JSONResponse:
        return JSONResponse(
            {"detail": str(exc), "errors": [{"parameter": exc.parameter, "message": exc.message}]}, status_code=422
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = []
        for error in exc.errors():
            location = [str(part) for part in error.get("loc", ()) if part not in ("query", "header", "path")]
            parameter = ".".join(location) or "request"
            message = error.get("msg", "invalid")
            if error.get("type") == "missing":
                message = f"is required, e.g. {_EXAMPLES.get(parameter, parameter + '=...')}"
            elif "input" in error:
                message += f" (got {error['input']!r})"
            errors.append({"parameter": parameter, "message": message})
        detail = "; ".join(f"{e['parameter']}: {e['message']}" for e in errors)
        return JSONResponse({"detail": detail, "errors": errors}, status_code=422)

    @app.exception_handler(NotAcceptable)
    async def _not_acceptable(request: Request, exc: NotAcceptable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=406)

    @app.exception_handler(KafkaUnavailableError)
    async def _kafka_down(request: Request, exc: KafkaUnavailableError) -> JSONResponse:
        detail = (
            str(exc)
            if "allow_partial" in str(exc)
            else f"{exc}; or add allow_partial=true to get the Iceberg part alone, with the missing offsets named"
        )
        return JSONResponse({"detail": detail}, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(K2Error)
    async def _k2_error(request: Request, exc: K2Error) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    limit_query = Query(
        ge=1, le=settings.max_page_rows, description=f"rows per page (at most {settings.max_page_rows})"
    )

    def _page(
        frame: pl.DataFrame, limit: int, query: str, after: Cursor | None, pinned: dict[str, Any]
    ) -> tuple[pl.DataFrame, str | None]:
        """The rows after the cursor, ordered by (timestamp, message_id), cut at ``limit``."""
        frame = frame.sort(["timestamp", "message_id"])
        if after is not None:
            moment, message_id = _from_micros(after.position[0]), str(after.position[1])
            frame = frame.filter(
                (pl.col("timestamp") > moment) | ((pl.col("timestamp") == moment) & (pl.col("message_id") > message_id))
            )
        page = frame.head(limit)
        if frame.height <= limit:
            return page, None
        last = page.row(page.height - 1, named=True)
        return page, Cursor(query, [_micros(last["timestamp"]), last["message_id"]], pinned).encode()

    def _check_as_of(as_of: str | None) -> int | datetime | None:
        if as_of is None or as_of == "":
            return None
        table = services.iceberg.trades()
        if as_of.isdigit():
            if table.snapshot_by_id(int(as_of)) is None:
                raise ParameterError(
                    "as_of",
                    f"market.trades has no snapshot {as_of} (it may have expired); "
                    "pass a time instead, e.g. as_of=2024-08-09T00:00:00Z",
                )
            return int(as_of)
        moment = parse_time("as_of", as_of)
        if table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000)) is None:
            raise ParameterError(
                "as_of", f"market.trades has no snapshot at or before {moment.isoformat()}; pick a later time"
            )
        return moment

    @app.get(
        "/v1/trades",
        tags=["trades"],
        dependencies=[Depends(require(READ_TRADES))],
        responses=_PAGED,
        summary="Trades of one or more symbols in a time window (Iceberg plus the Kafka tail)",
    )
    def trades(
        request: Request,
        symbol: Annotated[list[str], Query(description="symbol(s): repeat the parameter or separate with commas")],
        start: Annotated[str | None, Query(description="ISO 8601, inclusive; UTC unless it has an offset")] = None,
        end: Annotated[str | None, Query(description="ISO 8601, exclusive; UTC unless it has an offset")] = None,
        exchange: Annotated[str | None, Query(description="e.g. BINANCE or ASX")] = None,
        as_of: Annotated[
            str | None,
            Query(description="Iceberg snapshot id or ISO time: what the table held then (time travel; no Kafka tail)"),
        ] = None,
        limit: Annotated[int, limit_query] = settings.default_page_rows,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
        allow_partial: Annotated[
            bool,
            Query(
                description="when Kafka is down, answer from Iceberg alone and name "
                "the offsets left out (instead of 503)"
            ),
        ] = False,
    ) -> Response:
        symbols = parse_symbols(symbol)
        window_start, window_end = parse_time("start", start), parse_time("end", end)
        check_order(window_start, window_end)
        chosen_exchange = parse_exchange(exchange)
        query = query_fingerprint(
            "trades", symbols=symbols, start=window_start, end=window_end, exchange=chosen_exchange, as_of=as_of
        )
        after = _cursor(cursor, query, 2)
        pinned_as_of = _check_as_of(as_of)
        read_start = window_start
        if after is not None:
            resume = _from_micros(after.position[0])
            read_start = resume if read_start is None else max(read_start, resume)
        frame, missing = services.read_trades(
            allow_partial,
            lambda hybrid: hybrid.trades(
                symbols,
                read_start,
                window_end,
                exchange=chosen_exchange,
                as_of=pinned_as_of,
                allow_partial=allow_partial,
            ),
        )
        page, next_cursor = _page(frame, limit, query, after, {})
        return _respond(request, page, "/v1/trades", next_cursor, missing=missing)

    @app.get(
        "/v1/trades/recent",
        tags=["trades"],
        dependencies=[Depends(require(READ_TRADES))],
        responses=_PAGED,
        summary="The last N minutes of one symbol, including trades still in Kafka",
    )
    def recent_trades(
        request: Request,
        symbol: Annotated[str, Query(description="one symbol, e.g. BTCUSDT")],
        minutes: Annotated[
            float, Query(gt=0, le=settings.max_recent_minutes, description="window length in minutes")
        ] = 15.0,
        now: Annotated[
            str | None, Query(description="end of the window (inclusive), ISO 8601; default the server's clock")
        ] = None,
        limit: Annotated[int, limit_query] = settings.default_page_rows,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
        allow_partial: Annotated[
            bool,
            Query(
                description="when Kafka is down, answer from Iceberg alone and name "
                "the offsets left out (instead of 503)"
            ),
        ] = False,
    ) -> Response:
        if "," in symbol:
            raise ParameterError("symbol", "one symbol only here; use /v1/trades for several")
        (chosen,) = parse_symbols([symbol])
        given_now = parse_time("now", now)
        query = query_fingerprint("recent", symbol=chosen, minutes=minutes, now=given_now)
        after = _cursor(cursor, query, 2)
        # The window's end is fixed by the first page, so later pages page through the same window.
        end = _from_micros(after.pinned["now"]) if after is not None else (given_now or datetime.now(UTC))
        if after is None:
            frame, missing = services.read_trades(
                allow_partial,
                lambda hybrid: hybrid.recent_trades(chosen, minutes, now=end, allow_partial=allow_partial),
            )
        else:
            resume = max(end - timedelta(minutes=minutes), _from_micros(after.position[0]))
            frame, missing = services.read_trades(
                allow_partial,
                lambda hybrid: hybrid.trades(
                    chosen, resume, end + timedelta(microseconds=1), allow_partial=allow_partial
                ),
            )
        page, next_cursor = _page(frame, limit, query, after, {"now": _micros(end)})
        return _respond(
            request,
            page,
            "/v1/trades/recent",
            next_cursor,
            {"window": {"start": (end - timedelta(minutes=minutes)).isoformat(), "end": end.isoformat()}},
            missing=missing,
        )

    @app.get(
        "/v1/ohlcv",
        tags=["bars"],
        dependencies=[Depends(require(READ_OHLCV))],
        responses=_PAGED,
        summary="OHLCV bars from market.ohlcv",
    )
    def ohlcv(
        request: Request,
        symbol: Annotated[list[str], Query(description="symbol(s): repeat the parameter or separate with commas")],
        interval: Annotated[Literal["1m", "5m", "1h", "1d"], Query(description="bar length")] = "1m",
        start: Annotated[str | None, Query(description="bars starting at or after this ISO time")] = None,
        end: Annotated[str | None, Query(description="bars starting before this ISO time")] = None,
        window: Annotated[
            str | None, Query(description="instead of start: this long before end (or now), e.g. 90m, 6h, 7d")
        ] = None,
        exchange: Annotated[str | None, Query(description="e.g. BINANCE or ASX")] = None,
        limit: Annotated[int, limit_query] = settings.default_page_rows,
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> Response:
        symbols = parse_symbols(symbol)
        window_start, window_end = parse_time("start", start), parse_time("end", end)
        if window is not None and window != "":
            if window_start is not None:
                raise ParameterError("window", "pass either start or window, not both")
            window_end = window_end or datetime.now(UTC)
            window_start = window_end - parse_window(window)
        check_order(window_start, window_end)
        chosen_exchange = parse_exchange(exchange)
        query = query_fingerprint(
            "ohlcv",
            symbols=symbols,
            interval=interval,
            start=window_start,
            end=window_end,
            exchange=chosen_exchange,
            window=window,
        )
        after = _cursor(cursor, query, 3)
        table = services.iceberg.table(OHLCV)
        if table.current_snapshot() is None:
            bars = OHLCV.arrow_schema().empty_table()
        else:
            clauses = ["interval = ?", f"symbol IN ({', '.join('?' for _ in symbols)})"]
            parameters: list[Any] = [interval, *symbols]
            for clause, value in (
                ("exchange = ?", chosen_exchange),
                ("bucket_start >= ?", window_start),
                ("bucket_start < ?", window_end),
            ):
                if value is not None:
                    clauses.append(clause)
                    parameters.append(value)
            if after is not None:
                moment = _from_micros(after.position[0])
                clauses.append(
                    "(bucket_start > ? OR (bucket_start = ? AND (symbol > ? OR (symbol = ? AND exchange > ?))))"
                )
                parameters += [moment, moment, after.position[1], after.position[1], after.position[2]]
            sql = (
                "SELECT * EXCLUDE (computed_at) FROM iceberg_scan(getvariable('k2_ohlcv')) WHERE "
                + " AND ".join(clauses)
                + " ORDER BY bucket_start, symbol, exchange LIMIT ?"
            )
            connection = services.duckdb()
            try:
                connection.execute("SET VARIABLE k2_ohlcv = ?", [table.metadata_location])
                bars = connection.execute(sql, [*parameters, limit + 1]).fetch_arrow_table()
            finally:
                connection.close()
        next_cursor = None
        if bars.num_rows > limit:
            bars = bars.slice(0, limit)
            last = bars.slice(limit - 1, 1).to_pylist()[0]
            next_cursor = Cursor(query, [_micros(last["bucket_start"]), last["symbol"], last["exchange"]], {}).encode()
        return _respond(request, bars, "/v1/ohlcv", next_cursor)

    @app.get(
        "/v1/symbols",
        tags=["reference"],
        dependencies=[Depends(require(READ_TRADES))],
        responses=_PAGED,
        summary="Every symbol in market.trades with its first and last trade and trade count",
    )
    def symbols(
        request: Request,
        exchange: Annotated[str | None, Query(description="only this exchange, e.g. BINANCE or ASX")] = None,
    ) -> Response:
        chosen_exchange = parse_exchange(exchange)
        table = services.iceberg.trades()
        snapshot = table.current_snapshot()
        cache_key = (snapshot.snapshot_id if snapshot else None, chosen_exchange)
        rows = services._symbols_cache.get(cache_key)  # a snapshot never changes: its statistics neither
        if rows is None:
            if snapshot is None:
                rows = pl.DataFrame(
                    schema={
                        "symbol": pl.String,
                        "exchange": pl.String,
                        "first_trade": pl.Datetime("us", "UTC"),
                        "last_trade": pl.Datetime("us", "UTC"),
                        "trade_count": pl.Int64,
                    }
                )
            else:
                where, parameters = ("WHERE exchange = ?", [chosen_exchange]) if chosen_exchange else ("", [])
                connection = services.duckdb()
                try:
                    connection.execute("SET VARIABLE k2_trades = ?", [table.metadata_location])
                    rows = pl.from_arrow(
                        connection.execute(
                            'SELECT symbol, exchange, min("timestamp") AS first_trade, max("timestamp") AS last_trade, '
                            f"count(*) AS trade_count FROM iceberg_scan(getvariable('k2_trades')) {where} "
                            "GROUP BY symbol, exchange ORDER BY exchange, symbol",
                            parameters,
                        ).fetch_arrow_table()
                    )
                finally:
                    connection.close()
            services._symbols_cache = {cache_key: rows, **dict(list(services._symbols_cache.items())[:15])}  # newest 16
        return _respond(
            request,
            rows,
            "/v1/symbols",
            None,
            {
                "snapshot_id": cache_key[0],
                "note": "what market.trades holds (committed); trades still in Kafka are in /v1/trades",
            },
        )

    @app.get("/v1/health", tags=["operations"], summary="Catalog, Kafka and lag; 503 when the catalog is down")
    def health() -> JSONResponse:
        report = services.health.check()
        return JSONResponse(report, status_code=503 if report["status"] == "down" else 200)

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics of the API", response_class=Response)
    def metrics() -> Response:
        return Response(generate_latest(API_REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return app
