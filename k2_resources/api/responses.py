"""One response of rows: the negotiated format, rate and cursor headers, a partial answer's missing offsets."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
from fastapi import Request
from fastapi.responses import Response

from k2_resources.api.auth import rate_headers
from k2_resources.api.formats import ARROW, CSV, JSON, choose_media_type, render
from k2_resources.api.metrics import API_ROWS

PAGED: dict[int | str, dict[str, Any]] = {
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


def respond(
    request: Request,
    rows: pl.DataFrame | pa.Table,
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
        headers.update(rate_headers(decision))
    if next_cursor is not None:
        headers["X-Next-Cursor"] = next_cursor
        headers["Link"] = f'<{request.url.include_query_params(cursor=next_cursor)}>; rel="next"'
    body = render(rows, media_type, {"next_cursor": next_cursor, **(envelope or {})} if media_type == JSON else None)
    count = rows.height if isinstance(rows, pl.DataFrame) else rows.num_rows
    request.state.k2_rows = count  # for the audit line
    API_ROWS.labels(route=route).inc(count)
    return Response(
        content=body, media_type=media_type if media_type != CSV else "text/csv; charset=utf-8", headers=headers
    )
