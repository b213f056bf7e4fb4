"""Errors of the Binance feed."""

from __future__ import annotations

from k2_resources.errors import K2Error


class MalformedTradeMessage(K2Error):
    """A frame that cannot become a trade V2 record; ``code`` names the kind of fault."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
