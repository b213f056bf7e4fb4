"""``/v1/trades`` and ``/v1/trades/recent``: trades from the hybrid resource (Iceberg plus the Kafka tail).

Rows are ordered by (timestamp, message_id); a page's cursor holds the last row's key, and the
next page reads from that timestamp on (so it does not read the window again from its start).

No ``from __future__ import annotations`` in the router modules: FastAPI reads the routes'
``Annotated`` parameters at definition, and some name values local to the router's factory.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import polars as pl
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from k2_resources.api.auth import require
from k2_resources.api.errors import ParameterError
from k2_resources.api.formats import Cursor, choose_media_type, query_fingerprint
from k2_resources.api.keys import READ_TRADES
from k2_resources.api.pages import Rendered
from k2_resources.api.params import (
    check_order,
    decode_cursor,
    from_micros,
    micros,
    parse_exchange,
    parse_symbols,
    parse_time,
)
from k2_resources.api.responses import PAGED, render_page, send
from k2_resources.api.services import Services, services_of
from k2_resources.api.settings import ApiSettings

_PARTIAL = Query(
    description="when Kafka is down, answer from Iceberg alone and name the offsets left out (instead of 503)"
)
_CURSOR = Query(description="next_cursor of the previous page")


def page_of(
    frame: pl.DataFrame, limit: int, query: str, after: Cursor | None, pinned: dict[str, Any]
) -> tuple[pl.DataFrame, str | None]:
    """The rows after the cursor, ordered by (timestamp, message_id), cut at ``limit``."""
    frame = frame.sort(["timestamp", "message_id"])
    if after is not None:
        moment, message_id = from_micros(after.position[0]), str(after.position[1])
        frame = frame.filter(
            (pl.col("timestamp") > moment) | ((pl.col("timestamp") == moment) & (pl.col("message_id") > message_id))
        )
    page = frame.head(limit)
    if frame.height <= limit:
        return page, None
    last = page.row(page.height - 1, named=True)
    return page, Cursor(query, [micros(last["timestamp"]), last["message_id"]], pinned).encode()


def check_as_of(services: Services, as_of: str | None) -> int | datetime | None:
    """``as_of`` as a snapshot id or a time market.trades has a snapshot at, or a ParameterError."""
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
    assert moment is not None  # as_of is not empty
    if table.snapshot_as_of_timestamp(int(moment.timestamp() * 1000)) is None:
        raise ParameterError(
            "as_of", f"market.trades has no snapshot at or before {moment.isoformat()}; pick a later time"
        )
    return moment


def answer_trades(
    services: Services,
    accept: str,
    symbol: list[str],
    start: str | None,
    end: str | None,
    exchange: str | None,
    as_of: str | None,
    limit: int,
    cursor: str | None,
    allow_partial: bool,
) -> Rendered:
    symbols = parse_symbols(symbol)
    window_start, window_end = parse_time("start", start), parse_time("end", end)
    check_order(window_start, window_end)
    chosen_exchange = parse_exchange(exchange)
    query = query_fingerprint(
        "trades", symbols=symbols, start=window_start, end=window_end, exchange=chosen_exchange, as_of=as_of
    )
    after = decode_cursor(cursor, query, 2)
    pinned_as_of = check_as_of(services, as_of)
    read_start = window_start
    if after is not None:
        resume = from_micros(after.position[0])
        read_start = resume if read_start is None else max(read_start, resume)
    result = services.serving.read_trades(
        symbols,
        read_start,
        window_end,
        exchange=chosen_exchange,
        as_of=pinned_as_of,
        allow_partial=allow_partial,
        head=None if after is not None else limit + 1,  # a first page needs its rows and one more
    )
    version = getattr(result, "version", None)  # the identity of the files and offsets read
    key = None if version is None else (query, cursor, limit, accept, version)
    cached = services.pages.get(key)
    if cached is not None:
        return cached
    page, next_cursor = page_of(result.frame, limit, query, after, {})
    return render_page(accept, page, next_cursor, missing=dict(result.stats.missing), pages=services.pages, key=key)


def answer_recent(
    services: Services,
    accept: str,
    symbol: str,
    minutes: float,
    now: str | None,
    limit: int,
    cursor: str | None,
    allow_partial: bool,
) -> Rendered:
    if "," in symbol:
        raise ParameterError("symbol", "one symbol only here; use /v1/trades for several")
    serving = services.serving
    (chosen,) = parse_symbols([symbol])
    given_now = parse_time("now", now)
    query = query_fingerprint("recent", symbol=chosen, minutes=minutes, now=given_now)
    after = decode_cursor(cursor, query, 2)
    # The window's end is fixed by the first page, so later pages page through the same window.
    end = from_micros(after.pinned["now"]) if after is not None else (given_now or datetime.now(UTC))
    if after is None:
        # Inclusive of ``end``: the window ends one microsecond after it (as read_recent_trades).
        window_end = end + timedelta(microseconds=1)
        result = serving.read_trades(
            chosen, end - timedelta(minutes=minutes), window_end, allow_partial=allow_partial, head=limit + 1
        )
    else:
        resume = max(end - timedelta(minutes=minutes), from_micros(after.position[0]))
        result = serving.read_trades(chosen, resume, end + timedelta(microseconds=1), allow_partial=allow_partial)
    page, next_cursor = page_of(result.frame, limit, query, after, {"now": micros(end)})
    window = {"start": (end - timedelta(minutes=minutes)).isoformat(), "end": end.isoformat()}
    version = getattr(result, "version", None)
    # In one data version a page is identified by its first row and its length (rows are in a fixed order).
    rows_key = None if version is None or not page.height else (version, page["message_id"][0], page.height)
    return render_page(
        accept,
        page,
        next_cursor,
        {"window": window},
        missing=dict(result.stats.missing),
        pages=services.pages,
        rows_key=rows_key,
    )


def trades_router(settings: ApiSettings) -> APIRouter:
    """The trades routes; page sizes and the recent window are bounded by ``settings``."""
    router = APIRouter(tags=["trades"], dependencies=[Depends(require(READ_TRADES))], responses=PAGED)
    limit_query = Query(
        ge=1, le=settings.max_page_rows, description=f"rows per page (at most {settings.max_page_rows})"
    )

    @router.get("/v1/trades", summary="Trades of one or more symbols in a time window (Iceberg plus the Kafka tail)")
    async def trades(
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
        cursor: Annotated[str | None, _CURSOR] = None,
        allow_partial: Annotated[bool, _PARTIAL] = False,
    ) -> Response:
        services, accept = services_of(request), choose_media_type(request.headers.get("accept"))
        key = ("/v1/trades", tuple(symbol), start, end, exchange, as_of, limit, cursor, allow_partial, accept)
        page = await services.coalescer.run(
            key,
            lambda: answer_trades(services, accept, symbol, start, end, exchange, as_of, limit, cursor, allow_partial),
            "/v1/trades",
        )
        return send(request, page, "/v1/trades")

    @router.get("/v1/trades/recent", summary="The last N minutes of one symbol, including trades still in Kafka")
    async def recent_trades(
        request: Request,
        symbol: Annotated[str, Query(description="one symbol, e.g. BTCUSDT")],
        minutes: Annotated[
            float, Query(gt=0, le=settings.max_recent_minutes, description="window length in minutes")
        ] = 15.0,
        now: Annotated[
            str | None, Query(description="end of the window (inclusive), ISO 8601; default the server's clock")
        ] = None,
        limit: Annotated[int, limit_query] = settings.default_page_rows,
        cursor: Annotated[str | None, _CURSOR] = None,
        allow_partial: Annotated[bool, _PARTIAL] = False,
    ) -> Response:
        services, accept = services_of(request), choose_media_type(request.headers.get("accept"))
        key = ("/v1/trades/recent", symbol, minutes, now, limit, cursor, allow_partial, accept)
        page = await services.coalescer.run(
            key,
            lambda: answer_recent(services, accept, symbol, minutes, now, limit, cursor, allow_partial),
            "/v1/trades/recent",
        )
        return send(request, page, "/v1/trades/recent")

    return router
