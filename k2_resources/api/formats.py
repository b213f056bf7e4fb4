"""Response formats of the query API (JSON, CSV, Arrow IPC by ``Accept``) and its page cursors.

JSON is the default: ``{"data": [rows], "count": n, "next_cursor": ...}`` with prices and
quantities as decimal strings (exact; a JSON number would pass through a binary float) and
times in ISO 8601 UTC. ``text/csv`` gives a header row, list columns joined with ``;`` and map
columns as JSON; ``application/vnd.apache.arrow.stream`` gives an Arrow IPC stream in the
table's own types (decimal128, timestamp[us, UTC]). CSV and Arrow carry the next cursor in the
``X-Next-Cursor`` header (JSON in the body too), and every paged response a ``Link: rel="next"``.

A cursor is opaque to clients: URL-safe base64 of a small JSON object with the last row's sort
key and a fingerprint of the query it belongs to, so a cursor sent with another query is
refused rather than silently skipping rows.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass
from typing import Any, cast

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc

from k2_resources.api.errors import BadCursor, NotAcceptable

JSON = "application/json"
CSV = "text/csv"
ARROW = "application/vnd.apache.arrow.stream"
MEDIA_TYPES = (JSON, CSV, ARROW)
_ALIASES = {
    "application/*": JSON,
    "*/*": JSON,
    "text/*": CSV,
    "application/vnd.apache.arrow.file": ARROW,
    "application/x-arrow": ARROW,
}


def choose_media_type(accept: str | None) -> str:
    """The best of JSON, CSV, Arrow for an ``Accept`` header (q-values honoured; none: JSON)."""
    if not accept or not accept.strip():
        return JSON
    offers: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        pieces = [p.strip() for p in part.split(";")]
        media = pieces[0].lower()
        quality = 1.0
        for parameter in pieces[1:]:
            if parameter.startswith("q="):
                try:
                    quality = float(parameter[2:])
                except ValueError:
                    quality = 0.0
        chosen = media if media in MEDIA_TYPES else _ALIASES.get(media)
        if chosen and quality > 0:
            offers.append((-quality, position, chosen))
    if not offers:
        raise NotAcceptable(
            f"Accept: {accept} names no format this API returns; send one of "
            f"{', '.join(MEDIA_TYPES)} (or none for JSON)"
        )
    return sorted(offers)[0][2]


def _csv_ready(frame: pl.DataFrame) -> pl.DataFrame:
    """Nested columns flattened for CSV: lists joined with ';', maps and structs as JSON text."""
    columns: list[pl.Expr | pl.Series] = []
    for name, dtype in frame.schema.items():
        if isinstance(dtype, pl.List):
            columns.append(pl.col(name).list.join(";").alias(name))
        elif dtype.is_nested():
            values = [None if v is None else json.dumps(_jsonable(v), sort_keys=True) for v in frame[name].to_list()]
            columns.append(pl.Series(name, values, dtype=pl.String))
        else:
            columns.append(pl.col(name))
    return frame.select(columns)


def _jsonable(value: Any) -> Any:
    if isinstance(value, list) and all(isinstance(v, dict) and set(v) == {"key", "value"} for v in value):
        return {v["key"]: v["value"] for v in value}
    if isinstance(value, list) and all(isinstance(v, tuple) and len(v) == 2 for v in value):
        return dict(value)
    return value


def render(rows: pl.DataFrame | pa.Table, media_type: str, envelope: dict[str, Any] | None = None) -> bytes:
    """Rows as the body of one response in ``media_type``; ``envelope`` adds JSON keys next to ``data``."""
    if media_type == ARROW:
        table = rows if isinstance(rows, pa.Table) else rows.to_arrow()
        sink = io.BytesIO()
        with ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue()
    frame = (
        rows if isinstance(rows, pl.DataFrame) else cast(pl.DataFrame, pl.from_arrow(rows))
    )  # a Table gives a DataFrame
    if media_type == CSV:
        return _csv_ready(frame).write_csv(datetime_format="%Y-%m-%dT%H:%M:%S%.6fZ").encode()
    return json_envelope(json_rows(frame), frame.height, envelope)


def json_rows(frame: pl.DataFrame) -> bytes:
    """The rows as one JSON array (polars writes decimals as strings and maps as objects)."""
    return frame.write_json().encode() if frame.height else b"[]"


def json_envelope(rows: bytes, count: int, envelope: dict[str, Any] | None = None) -> bytes:
    """A JSON body: the rows' array under ``data``, then ``count`` and the envelope's keys."""
    head = {"count": count, **(envelope or {})}
    return b'{"data":' + rows + b"," + json.dumps(head, default=str)[1:].encode()


# ---------------------------------------------------------------------------------------------
# Cursors
# ---------------------------------------------------------------------------------------------


def query_fingerprint(endpoint: str, **parameters: Any) -> str:
    """A short tag of an endpoint and its query parameters (page size and cursor excluded)."""
    text = json.dumps([endpoint, sorted((k, str(v)) for k, v in parameters.items())])
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()[:9]).decode()


@dataclass(frozen=True)
class Cursor:
    """Where the next page starts: after ``position`` (the last row's sort key) of query ``query``."""

    query: str
    position: list[Any]
    pinned: dict[str, Any]  # values fixed by the first page (e.g. the end of a "recent" window)

    def encode(self) -> str:
        payload = json.dumps({"v": 1, "q": self.query, "p": self.position, "x": self.pinned}, separators=(",", ":"))
        return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str, query: str, positions: int) -> Cursor:
        try:
            raw = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            cursor = cls(query=raw["q"], position=list(raw["p"]), pinned=dict(raw.get("x") or {}))
        except (binascii.Error, ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise BadCursor(
                "cursor is not one this API issued; pass the next_cursor of the previous page "
                "unchanged, or drop it to start from the first page"
            ) from exc
        if raw.get("v") != 1 or len(cursor.position) != positions:
            raise BadCursor("cursor is not one this API issued; pass the next_cursor of the previous page unchanged")
        if cursor.query != query:
            raise BadCursor(
                "cursor belongs to a different query; send it with the same parameters as the page "
                "that returned it, or drop it to start from the first page"
            )
        return cursor
