"""``/v1/trades/stream``: a WebSocket of trades from a start time, history then live, each trade once.

The stream is :meth:`HybridQueryResource.subscribe` (see :mod:`k2_resources.trades.subscribe`):
the history of one pinned Iceberg snapshot, then the Kafka log from the offsets that snapshot
committed. Query parameters: ``symbol`` (repeat or comma-separate; none: every symbol),
``exchange``, ``start`` (ISO 8601; none: the table's whole history), ``cursor`` (resume exactly
after the last message received; it carries the filters).

Credentials: a browser's WebSocket cannot send headers, so the key is taken, in this order, from
``X-API-Key`` or ``Authorization: Bearer``, from the ``api_key`` query parameter, or from a first
message ``{"api_key": "k2_..."}`` (or ``{"token": "<JWT>"}``) sent within 10 s of connecting.
The route needs ``read:trades``, like the other trade routes, and each connection takes one token
from the key's bucket (a reconnect is a request).

Messages (JSON text frames)::

    {"type": "trades", "phase": "history"|"live", "count": n, "cursor": "...", "data": [rows]}
    {"type": "live", "cursor": "..."}        once, when the history is delivered
    {"type": "heartbeat", "cursor": "..."}   after 5 s without trades (the cursor may have moved)
    {"type": "error", "status": 400|401|403|429|503, "detail": "..."}   then the server closes

A refusal closes with code 4000 + the HTTP status (4400 a bad parameter or cursor, 4401, 4403,
4429, 4503 Kafka unavailable: reconnect later with the last cursor) and a reason of at most 123
bytes; the ``error`` message before it holds the whole explanation and its fix.

No ``from __future__ import annotations``: FastAPI reads the route's signature at definition.
"""

import asyncio
import contextlib
import inspect
import json
import time
from typing import Any, cast

import polars as pl
from fastapi import APIRouter, WebSocket
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from starlette.websockets import WebSocketDisconnect, WebSocketState

from k2_resources.api.auth import require
from k2_resources.api.errors import ApiError, ParameterError, StreamRefusal
from k2_resources.api.keys import READ_TRADES
from k2_resources.api.params import parse_exchange, parse_symbols, parse_time
from k2_resources.api.services import services_of
from k2_resources.errors import K2Error, KafkaUnavailableError
from k2_resources.trades.errors import CursorError
from k2_resources.trades.subscribe import Subscription

FIRST_MESSAGE_TIMEOUT_S = 10.0
HEARTBEAT_S = 5.0
POLL_INTERVAL_S = 0.05
HISTORY_ROWS_PER_MESSAGE = 1_000

router = APIRouter(tags=["trades"])


async def _credential(websocket: WebSocket) -> tuple[str | None, str | None]:
    """(API key, bearer credential) from the headers, the query or the first message."""
    header_key = websocket.headers.get("x-api-key")
    authorization = websocket.headers.get("authorization") or ""
    bearer = authorization[7:].strip() if authorization.lower().startswith("bearer ") else None
    if header_key or bearer:
        return header_key, bearer
    if websocket.query_params.get("api_key"):
        return websocket.query_params["api_key"], None
    try:
        text = await asyncio.wait_for(websocket.receive_text(), FIRST_MESSAGE_TIMEOUT_S)
        first = json.loads(text)
    except (TimeoutError, ValueError, KeyError):
        return None, None
    if not isinstance(first, dict):
        return None, None
    return first.get("api_key"), first.get("token")


async def _admit(websocket: WebSocket) -> None:
    """The route's scope and bucket, by the same dependency as the HTTP routes (401/403/429)."""
    header_key, bearer = await _credential(websocket)
    credentials = HTTPAuthorizationCredentials(scheme="Bearer", credentials=bearer) if bearer else None
    try:
        # The HTTP routes' own check: a WebSocket is a connection with headers, state and app, as a request is.
        checked = require(READ_TRADES)(cast(Any, websocket), header_key, credentials)
        if inspect.isawaitable(checked):
            await checked
    except ApiError as error:
        raise StreamRefusal(error.status, error.detail) from None


def _subscription(websocket: WebSocket) -> Subscription:
    query = websocket.query_params
    try:
        symbols = parse_symbols(query.getlist("symbol")) if query.getlist("symbol") else None
        return services_of(cast(Any, websocket)).hybrid.subscribe(
            symbols,
            start=parse_time("start", query.get("start")),
            exchange=parse_exchange(query.get("exchange")),
            cursor=query.get("cursor") or None,
            batch_rows=HISTORY_ROWS_PER_MESSAGE,
        )
    except (ParameterError, CursorError) as error:
        raise StreamRefusal(400, str(error)) from None


async def _watch_disconnect(websocket: WebSocket, gone: asyncio.Event) -> None:
    """Reads (and ignores) client messages until the client goes: then sets ``gone``."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
    gone.set()


_ENCODED: dict[int, tuple[pl.DataFrame, str]] = {}  # id(frame) -> (frame, its JSON rows); the frame keeps its id


def _json_rows(frame: pl.DataFrame) -> str:
    """``frame``'s rows as JSON, encoded once for every subscriber given the same (shared) live batch."""
    found = _ENCODED.get(id(frame))
    if found is not None and found[0] is frame:
        return found[1]
    encoded = frame.write_json()
    if len(_ENCODED) >= 64:
        _ENCODED.pop(next(iter(_ENCODED)))
    _ENCODED[id(frame)] = (frame, encoded)
    return encoded


async def _pump(websocket: WebSocket, subscription: Subscription, gone: asyncio.Event) -> None:
    """Send batches as they come, the phase change once, a heartbeat when quiet; until the client goes."""
    announced_live = False
    quiet_since = time.monotonic()
    while not gone.is_set():
        try:
            # Up to date: no thread hop, no I/O (a thread follows the log ends for every subscription).
            batch = await run_in_threadpool(subscription.poll) if subscription.has_news() else None
        except KafkaUnavailableError as error:
            raise StreamRefusal(503, f"{error}; reconnect later with the last cursor you received") from None
        except CursorError as error:
            raise StreamRefusal(400, str(error)) from None
        phase = subscription.phase
        if batch is not None:
            data = _json_rows(cast(pl.DataFrame, batch))  # the subscription yields polars (as_="polars")
            head = json.dumps({"type": "trades", "phase": phase, "count": len(batch), "cursor": subscription.cursor})
            await websocket.send_text(head[:-1] + ',"data":' + data + "}")
            quiet_since = time.monotonic()
            continue  # more may be ready at once (history, or a burst)
        if phase == "live" and not announced_live:
            await websocket.send_text(json.dumps({"type": "live", "cursor": subscription.cursor}))
            announced_live = True
        elif time.monotonic() - quiet_since >= HEARTBEAT_S:
            await websocket.send_text(json.dumps({"type": "heartbeat", "cursor": subscription.cursor}))
            quiet_since = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), POLL_INTERVAL_S)


async def _close_with(websocket: WebSocket, refusal: StreamRefusal) -> None:
    if websocket.client_state != WebSocketState.CONNECTED:
        return
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_text(json.dumps({"type": "error", "status": refusal.status, "detail": refusal.detail}))
        reason = refusal.detail.encode()[:123].decode(errors="ignore")  # a close reason holds 123 bytes
        await websocket.close(code=4000 + refusal.status, reason=reason)


@router.websocket("/v1/trades/stream")
async def trades_stream(websocket: WebSocket) -> None:
    """Trades from ``start`` (or after ``cursor``): history from Iceberg, then live from Kafka (see the module doc)."""
    await websocket.accept()
    subscription: Subscription | None = None
    watcher: asyncio.Task | None = None
    try:
        await _admit(websocket)
        subscription = await run_in_threadpool(_subscription, websocket)
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(websocket, gone))
        await _pump(websocket, subscription, gone)
    except StreamRefusal as refusal:
        await _close_with(websocket, refusal)
    except K2Error as error:  # before RuntimeError: a K2Error is one
        await _close_with(websocket, StreamRefusal(503, str(error)))
    except (WebSocketDisconnect, RuntimeError):
        pass  # the client went away mid-send
    finally:
        if watcher is not None:
            watcher.cancel()
        if subscription is not None:
            subscription.close()
