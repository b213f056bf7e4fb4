"""Admission control: a saturated API answers 503 with Retry-After at once instead of queueing.

Pure ASGI, on the event loop: a request to a data route is admitted while fewer than
``max_in_flight`` are being answered, else refused in microseconds (a client retries after
``Retry-After``; queueing would only turn every answer into a late one). Cheap routes (recent
windows, the point query, health and metrics) keep the whole limit; expensive ones (symbols,
bars, unbounded trade windows) get a share that falls as the platform's degradation level rises
(:meth:`~k2_resources.api.health.HealthProbe.current_level`), so they are shed first. The share
never reaches zero: one request at a time still gets through at CIRCUIT_BREAK.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from k2_resources.api.metrics import API_IN_FLIGHT
from k2_resources.degradation.levels import DegradationLevel

RETRY_AFTER_S = 1
OPEN_PATHS = frozenset({"/v1/health", "/metrics", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc"})
CHEAP_PATHS = frozenset({"/v1/trades/recent", "/v1/_bench/bytes"})
# The share of ``max_in_flight`` expensive requests may take, by degradation level.
EXPENSIVE_SHARE: dict[int, float] = {
    DegradationLevel.NORMAL: 1.0,
    DegradationLevel.SOFT: 1.0,
    DegradationLevel.GRACEFUL: 0.5,
    DegradationLevel.AGGRESSIVE: 0.25,
    DegradationLevel.CIRCUIT_BREAK: 0.0,
}


def is_cheap(scope: dict[str, Any]) -> bool:
    """Recent windows, and ``/v1/trades`` with both ends of its window (a bounded read)."""
    path = scope.get("path", "")
    if path in CHEAP_PATHS:
        return True
    if path == "/v1/trades":
        query = scope.get("query_string", b"")
        return b"start=" in query and b"end=" in query
    return False


class AdmissionMiddleware:
    """Refuses data requests beyond ``max_in_flight`` (fewer for expensive ones as the level rises)."""

    def __init__(self, app: Any, max_in_flight: int, level: Callable[[], int] | None = None) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.level = level
        self.in_flight = 0  # one event loop: no lock needed
        self.refused = 0

    def limit_for(self, scope: dict[str, Any]) -> int:
        if is_cheap(scope):
            return self.max_in_flight
        level = self.level() if self.level is not None else DegradationLevel.NORMAL
        return max(1, int(self.max_in_flight * EXPENSIVE_SHARE.get(int(level), 0.0)))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit_for(scope):
            self.refused += 1
            scope.setdefault("state", {})["k2_reason"] = "overloaded"  # for the audit line
            await _refuse(send, self.in_flight)
            return
        self.in_flight += 1
        API_IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            API_IN_FLIGHT.dec()


async def _refuse(send: Any, in_flight: int) -> None:
    body = json.dumps(
        {
            "detail": f"the API is answering {in_flight} requests, its limit (K2_API_MAX_IN_FLIGHT); "
            f"retry after {RETRY_AFTER_S} s"
        }
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
