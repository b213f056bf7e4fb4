"""``/v1/ohlcv``: OHLCV bars from market.ohlcv through DuckDB, every value a bound parameter.

Rows are ordered by (bucket_start, symbol, exchange); a page's cursor holds the last bar's key.
"""

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import pyarrow as pa
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from k2_resources.api.auth import require
from k2_resources.api.errors import ParameterError
from k2_resources.api.formats import Cursor, query_fingerprint
from k2_resources.api.keys import READ_OHLCV
from k2_resources.api.params import (
    check_order,
    decode_cursor,
    from_micros,
    micros,
    parse_exchange,
    parse_symbols,
    parse_time,
    parse_window,
)
from k2_resources.api.responses import PAGED, respond
from k2_resources.api.services import Services, services_of
from k2_resources.api.settings import ApiSettings
from k2_resources.catalog.tables import OHLCV


def read_bars(
    services: Services,
    symbols: tuple[str, ...],
    interval: str,
    exchange: str | None,
    start: datetime | None,
    end: datetime | None,
    after: Cursor | None,
    limit: int,
) -> pa.Table:
    """Up to ``limit + 1`` bars after the cursor (the extra one says whether another page follows)."""
    table = services.iceberg.table(OHLCV)
    if table.current_snapshot() is None:
        return OHLCV.arrow_schema().empty_table()
    clauses = ["interval = ?", f"symbol IN ({', '.join('?' for _ in symbols)})"]
    parameters: list[Any] = [interval, *symbols]
    for clause, value in (("exchange = ?", exchange), ("bucket_start >= ?", start), ("bucket_start < ?", end)):
        if value is not None:
            clauses.append(clause)
            parameters.append(value)
    if after is not None:
        moment = from_micros(after.position[0])
        clauses.append("(bucket_start > ? OR (bucket_start = ? AND (symbol > ? OR (symbol = ? AND exchange > ?))))")
        parameters += [moment, moment, after.position[1], after.position[1], after.position[2]]
    sql = (
        "SELECT * EXCLUDE (computed_at) FROM iceberg_scan(getvariable('k2_ohlcv')) WHERE "
        + " AND ".join(clauses)
        + " ORDER BY bucket_start, symbol, exchange LIMIT ?"
    )
    connection = services.duckdb()
    try:
        connection.execute("SET VARIABLE k2_ohlcv = ?", [table.metadata_location])
        return connection.execute(sql, [*parameters, limit + 1]).fetch_arrow_table()
    finally:
        connection.close()


def answer_bars(
    request: Request,
    symbol: list[str],
    interval: str,
    start: str | None,
    end: str | None,
    window: str | None,
    exchange: str | None,
    limit: int,
    cursor: str | None,
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
    after = decode_cursor(cursor, query, 3)
    bars = read_bars(services_of(request), symbols, interval, chosen_exchange, window_start, window_end, after, limit)
    next_cursor = None
    if bars.num_rows > limit:
        bars = bars.slice(0, limit)
        last = bars.slice(limit - 1, 1).to_pylist()[0]
        next_cursor = Cursor(query, [micros(last["bucket_start"]), last["symbol"], last["exchange"]], {}).encode()
    return respond(request, bars, "/v1/ohlcv", next_cursor)


def bars_router(settings: ApiSettings) -> APIRouter:
    """The bars route; page sizes are bounded by ``settings``."""
    router = APIRouter(tags=["bars"], dependencies=[Depends(require(READ_OHLCV))], responses=PAGED)
    limit_query = Query(
        ge=1, le=settings.max_page_rows, description=f"rows per page (at most {settings.max_page_rows})"
    )

    @router.get("/v1/ohlcv", summary="OHLCV bars from market.ohlcv")
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
        return answer_bars(request, symbol, interval, start, end, window, exchange, limit, cursor)

    return router
