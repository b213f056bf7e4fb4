"""The query API's audit trail: one JSON line per request, allowed or refused, in a file K2 rotates.

A line holds ``time`` (UTC, ISO 8601), ``principal`` (``key:<id>``, ``jwt:<sub>`` or null when
refused before one was known), ``credential`` (``api_key``, ``jwt`` or ``none``), ``credential_id``
(the key id, or the token's ``jti`` or digest: never a key or a token; for a refused request, the
id the request claimed), ``method``, ``endpoint`` (the route template, e.g. ``/v1/trades``),
``params_sha256`` (of the sorted query parameters: what was asked can be matched against a
reproduction without the log holding it), ``status``, ``rows`` (returned), ``reason`` (why it was
refused: ``no_credential``, ``unknown_or_revoked_key``, ``expired``, ``wrong_audience``,
``bad_signature``, ``missing_scope``, ``rate_limited``...), ``client`` and ``duration_ms``.

Several uvicorn workers append to the same file, so rotation is not :class:`logging.handlers.
RotatingFileHandler`'s (each process would rotate on its own view of the size and rename the
file another had just started): each write takes an ``flock`` on ``<file>.lock``, reopens the file
when another process rotated it (its inode changed), rotates when the line would pass
``max_bytes`` (``audit.log`` -> ``audit.log.1`` ... ``.<backups>``), and appends the line with one
``write`` (O_APPEND). Files are created 0600. Settings: ``K2_API_AUDIT_FILE`` (default
``K2_HOME/api/audit.log``), ``K2_API_AUDIT_MAX_BYTES`` (default 100 MiB), ``K2_API_AUDIT_BACKUPS``
(default 10).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from k2_resources.errors import K2Error
from k2_resources.metrics import API_AUDIT_LINES, API_AUDIT_WRITE_ERRORS
from k2_resources.paths import k2_home

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 100 * 1024 * 1024
DEFAULT_BACKUPS = 10


def default_audit_file() -> Path:
    configured = os.environ.get("K2_API_AUDIT_FILE")
    return Path(configured).expanduser() if configured else k2_home() / "api" / "audit.log"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name) or ""
    try:
        return int(raw) if raw else default
    except ValueError as exc:
        raise K2Error(f"{name}={raw!r} is not a whole number; unset it or give e.g. {default}") from exc


def params_digest(query_string: bytes | str) -> str:
    """SHA-256 of the query parameters, sorted, so the same question gives the same digest."""
    text = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
    pairs = sorted(parse_qsl(text, keep_blank_values=True))
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def outcome_of(status: int) -> str:
    """``allowed`` (2xx-3xx), ``refused`` (401, 403, 429), ``failed`` (any other error)."""
    if status < 400:
        return "allowed"
    return "refused" if status in (401, 403, 429) else "failed"


class AuditLog:
    """Appends audit lines to ``path``, rotating it safely across processes; thread-safe."""

    def __init__(self, path: Path | None = None, max_bytes: int | None = None, backups: int | None = None) -> None:
        self.path = Path(path) if path is not None else default_audit_file()
        self.max_bytes = max_bytes if max_bytes is not None else _env_int("K2_API_AUDIT_MAX_BYTES", DEFAULT_MAX_BYTES)
        self.backups = backups if backups is not None else _env_int("K2_API_AUDIT_BACKUPS", DEFAULT_BACKUPS)
        if self.max_bytes < 1024 or self.backups < 1:
            raise K2Error(
                f"audit log rotation at {self.max_bytes} bytes with {self.backups} backups: give at least "
                "1024 bytes (K2_API_AUDIT_MAX_BYTES) and 1 backup (K2_API_AUDIT_BACKUPS)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def _current(self) -> int:
        """The open file, reopened when another process rotated (or someone removed) it."""
        if self._fd is None:
            return self._open()
        try:
            if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
                return self._fd
        except FileNotFoundError:
            pass
        return self._open()

    def _rotate(self) -> int:
        for index in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        return self._open()

    def write(self, entry: dict[str, Any]) -> None:
        """Append one line; a failure is counted and logged, never raised into the request."""
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        try:
            with self._thread_lock:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
                try:
                    descriptor = self._current()
                    if os.fstat(descriptor).st_size + len(line) > self.max_bytes:
                        descriptor = self._rotate()
                    os.write(descriptor, line)
                finally:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        except OSError as exc:
            API_AUDIT_WRITE_ERRORS.inc()
            logger.error(
                "the audit line of a %s request could not be written to %s: %s", entry.get("endpoint"), self.path, exc
            )
            return
        API_AUDIT_LINES.labels(
            outcome=outcome_of(int(entry.get("status", 500))), credential=entry.get("credential", "none")
        ).inc()

    def close(self) -> None:
        with self._thread_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            os.close(self._lock_fd)

    @staticmethod
    def entry(scope: dict[str, Any], status: int, started_at: datetime, duration_s: float) -> dict[str, Any]:
        """The audit line of one finished request from its ASGI scope (the auth dependency and
        ``respond`` leave the principal and the row count in ``scope["state"]``)."""
        state = scope.get("state") or {}
        client = scope.get("client")
        return {
            "time": started_at.isoformat(timespec="milliseconds"),
            "principal": state.get("k2_principal"),
            "credential": state.get("k2_credential", "none"),
            "credential_id": state.get("k2_credential_id"),
            "method": scope.get("method"),
            "endpoint": getattr(scope.get("route"), "path", scope.get("path")),
            "params_sha256": params_digest(scope.get("query_string", b"")),
            "status": status,
            "rows": state.get("k2_rows", 0),
            "reason": state.get("k2_reason"),
            "client": client[0] if client else None,
            "duration_ms": round(duration_s * 1000, 2),
        }


def now() -> datetime:
    return datetime.now(UTC)
