"""Request counts and times by route template, as ASGI middleware."""

from __future__ import annotations

import time
from typing import Any

from k2_resources.api.metrics import API_REQUEST_SECONDS, API_REQUESTS


class MetricsMiddleware:
    """Counts requests and times them by route template (pure ASGI: no per-request task overhead)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            API_REQUESTS.labels(route=route, status=str(status["code"])).inc()
            API_REQUEST_SECONDS.labels(route=route).observe(time.perf_counter() - started)
