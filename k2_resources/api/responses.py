"""One response of rows: the negotiated format, rate and cursor headers, a partial answer's missing offsets."""

from __future__ import annotations

from typing import Any

import polars as pl
import pyarrow as pa
from fastapi import Request
from fastapi.responses import Response

from k2_resources.api.auth import rate_headers
from k2_resources.api.formats import ARROW, CSV, JSON, choose_media_type, json_envelope, json_rows, render
from k2_resources.api.metrics import API_ROWS
from k2_resources.api.pages import PageCache, Rendered
from k2_resources.trades.hybrid_result import as_frame

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
    pages: PageCache | None = None,
    key: tuple | None = None,
    rows_key: tuple | None = None,
) -> Response:
    """Rows in the negotiated format with rate, cursor and (for a partial answer) missing-offsets headers."""
    page = render_page(request.headers.get("accept"), rows, next_cursor, envelope, missing, pages, key, rows_key)
    return send(request, page, route)


def render_page(
    accept: str | None,
    rows: pl.DataFrame | pa.Table,
    next_cursor: str | None = None,
    envelope: dict[str, Any] | None = None,
    missing: dict[str, str] | None = None,
    pages: PageCache | None = None,
    key: tuple | None = None,
    rows_key: tuple | None = None,
) -> Rendered:
    """Rows encoded in the format ``accept`` negotiates, minus the per-request headers; kept in
    ``pages`` under ``key`` when both are given. ``rows_key`` (the identity of the rows: data
    version and page) keeps their encoding alone, for answers whose envelope changes per request."""
    media_type = choose_media_type(accept)
    partial = None
    if missing:
        # Kafka was down and the client asked for allow_partial: say which offsets are not in the rows.
        partial = "; ".join(ranges for _, ranges in sorted(missing.items()))
        envelope = {**(envelope or {}), "partial": True, "missing_kafka_offsets": missing}
    count = rows.height if isinstance(rows, pl.DataFrame) else rows.num_rows
    head = {"next_cursor": next_cursor, **(envelope or {})} if media_type == JSON else None
    if pages is not None and rows_key is not None:
        # The rows' encoding is kept by their identity; the envelope (window, cursor) is per request.
        encoded = pages.get((*rows_key, media_type))
        if encoded is None:
            frame = rows if isinstance(rows, pl.DataFrame) else as_frame(rows)
            encoded = Rendered(
                json_rows(frame) if media_type == JSON else render(frame, media_type), media_type, None, count
            )
            pages.put((*rows_key, media_type), encoded)
        body = json_envelope(encoded.body, count, head) if media_type == JSON else encoded.body
    else:
        body = render(rows, media_type, head)
    rendered = Rendered(body, media_type, next_cursor, count, partial)
    if pages is not None and key is not None:
        pages.put(key, rendered)
    return rendered


def send(request: Request, page: Rendered, route: str) -> Response:
    """A rendered page with this request's rate and cursor headers."""
    headers: dict[str, str] = {}
    if page.partial:
        headers["X-K2-Partial"] = page.partial
    decision = getattr(request.state, "rate", None)
    if decision is not None:
        headers.update(rate_headers(decision))
    if page.next_cursor is not None:
        headers["X-Next-Cursor"] = page.next_cursor
        headers["Link"] = f'<{request.url.include_query_params(cursor=page.next_cursor)}>; rel="next"'
    request.state.k2_rows = page.count  # for the audit line
    API_ROWS.labels(route=route).inc(page.count)
    media_type = page.media_type if page.media_type != CSV else "text/csv; charset=utf-8"
    return Response(content=page.body, media_type=media_type, headers=headers)
