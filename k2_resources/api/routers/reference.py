"""``/v1/symbols``: every symbol in market.trades with its first and last trade and trade count.

From the per-data-file summaries of :mod:`k2_resources.api.summary` (a new snapshot reads only its
new files), or DuckDB over the snapshot when it has delete files.
"""

from typing import Annotated, Any, cast

import polars as pl
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response

from k2_resources.api.auth import require
from k2_resources.api.keys import READ_TRADES
from k2_resources.api.params import parse_exchange
from k2_resources.api.responses import PAGED, respond
from k2_resources.api.services import Services, services_of

router = APIRouter(tags=["reference"], dependencies=[Depends(require(READ_TRADES))], responses=PAGED)

_EMPTY_SCHEMA: dict[str, pl.DataType | type[pl.DataType]] = {
    "symbol": pl.String,
    "exchange": pl.String,
    "first_trade": pl.Datetime("us", "UTC"),
    "last_trade": pl.Datetime("us", "UTC"),
    "trade_count": pl.Int64,
}


def symbol_statistics(services: Services, metadata_location: str, exchange: str | None) -> pl.DataFrame:
    """First and last trade and trade count per (symbol, exchange) of one snapshot, through DuckDB."""
    where, parameters = ("WHERE exchange = ?", [exchange]) if exchange else ("", [])
    connection = services.duckdb()
    try:
        connection.execute("SET VARIABLE k2_trades = ?", [metadata_location])
        rows = connection.execute(
            'SELECT symbol, exchange, min("timestamp") AS first_trade, max("timestamp") AS last_trade, '
            f"count(*) AS trade_count FROM iceberg_scan(getvariable('k2_trades')) {where} "
            "GROUP BY symbol, exchange ORDER BY exchange, symbol",
            parameters,
        ).fetch_arrow_table()
    finally:
        connection.close()
    return cast(pl.DataFrame, pl.from_arrow(rows))  # a Table gives a DataFrame


@router.get("/v1/symbols", summary="Every symbol in market.trades with its first and last trade and trade count")
def symbols(
    request: Request,
    exchange: Annotated[str | None, Query(description="only this exchange, e.g. BINANCE or ASX")] = None,
) -> Response:
    services = services_of(request)
    chosen_exchange = parse_exchange(exchange)
    table = services.serving.table()  # metadata cached per metadata file
    snapshot = table.current_snapshot()
    cache_key = (snapshot.snapshot_id if snapshot else None, chosen_exchange)
    rows: Any = services.cached_symbols(cache_key)  # a snapshot never changes: its statistics neither
    if rows is None:
        if snapshot is None:
            rows = pl.DataFrame(schema=_EMPTY_SCHEMA)
        else:  # from per-file summaries (new files only); DuckDB over the snapshot when it has delete files
            rows = services.symbol_summary.statistics(table, snapshot.snapshot_id, chosen_exchange)
            if rows is None:
                rows = symbol_statistics(services, table.metadata_location, chosen_exchange)
        services.cache_symbols(cache_key, rows)
    return respond(
        request,
        rows,
        "/v1/symbols",
        None,
        {
            "snapshot_id": cache_key[0],
            "note": "what market.trades holds (committed); trades still in Kafka are in /v1/trades",
        },
    )
