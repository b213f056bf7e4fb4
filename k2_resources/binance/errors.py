"""Errors of the Binance feed."""

from __future__ import annotations

from k2_resources.errors import K2Error


class MalformedTradeMessage(K2Error):
    """A frame that cannot become a trade V2 record; ``code`` names the kind of fault."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


class RestRefused(K2Error):
    """The REST endpoint refused the request for good (401/403/451: no key, forbidden, geo-blocked;
    400: a request it will never accept). Retrying cannot help; the gap is reported as a loss."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"Binance REST answered HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class RestUnavailable(K2Error):
    """The REST endpoint could not be reached or answered an error a later try may not get
    (a timeout, a connection error, a 5xx, a body that is not JSON)."""

    retriable = True


class GapFillTimeout(K2Error):
    """A gap's fill_timeout_s passed before it was filled (e.g. a long 429/418 ban): it is reported as a loss."""
