"""Errors of the query API, each answered with one HTTP status (see ``handlers``).

``ParameterError`` 422 (the parameter and its fix), ``NotAcceptable`` 406, ``ApiError`` its own
status (401, 403, 429) and headers; ``TokenSettingsError`` stops the API at start (bad K2_API_JWT_*).
``BadCursor`` becomes a ``ParameterError`` on ``cursor``.
The first three were ``ValueError`` before they were ``K2Error``; they are both, so code that
catches ``ValueError`` still does.
"""

from __future__ import annotations

from k2_resources.errors import K2Error


class ParameterError(K2Error, ValueError):
    """A query parameter the API cannot use; answered with 422 naming it and the fix."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"{parameter}: {message}")
        self.parameter = parameter
        self.message = message


class NotAcceptable(K2Error, ValueError):
    """The Accept header names no format the API can produce (406)."""


class BadCursor(K2Error, ValueError):
    """A cursor that this API did not issue for this query."""


class ApiError(K2Error):
    """A refused request with its HTTP status and headers: no or a bad key (401), a missing scope
    (403), an empty token bucket (429, retriable after Retry-After)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None, reason: str = "") -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}
        self.retriable = status == 429
        self.reason = reason  # a short word for the audit line: expired, revoked, missing_scope...


class TokenSettingsError(K2Error):
    """Bearer-token settings (K2_API_JWT_*) or the JWKS they name are unusable; the API does not start."""


class StreamRefusal(K2Error):
    """Ends a trade subscription with an error message and a close code (4000 + the HTTP status)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail
