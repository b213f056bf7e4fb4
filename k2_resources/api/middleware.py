"""Request counts and times by route template, and the audit line of every request, as ASGI middleware."""

from __future__ import annotations

import time
from typing import Any

from k2_resources.api.audit import AuditLog, now
from k2_resources.api.metrics import API_REQUEST_SECONDS, API_REQUESTS


class MetricsMiddleware:
    """Counts requests and times them by route template, and writes each one's audit line (pure ASGI:
    no per-request task overhead)."""

    def __init__(self, app: Any, audit: AuditLog | None = None) -> None:
        self.app = app
        self.audit = audit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, started_at = time.perf_counter(), now()
        status = {"code": 500}
        scope.setdefault("state", {})  # where request.state keeps what the audit line names

        async def recording_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            API_REQUESTS.labels(route=route, status=str(status["code"])).inc()
            elapsed = time.perf_counter() - started
            API_REQUEST_SECONDS.labels(route=route).observe(elapsed)
            if self.audit is not None:
                self.audit.write(AuditLog.entry(scope, status["code"], started_at, elapsed))
