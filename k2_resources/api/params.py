"""Query parameters of the API: parsed and checked, or a ParameterError naming the fix."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

from k2_resources.api.errors import BadCursor, ParameterError
from k2_resources.api.formats import Cursor

MAX_SYMBOLS = 100
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EXAMPLES = {"symbol": "symbol=BTCUSDT (repeat it, or separate symbols with commas, for several)"}
_SYMBOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,31}$")
_EXCHANGE = re.compile(r"^[A-Za-z0-9_]{1,32}$")
_WINDOW = re.compile(r"^(\d{1,6})(s|m|h|d)$")
_WINDOW_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_time(parameter: str, text: str | None) -> datetime | None:
    """An ISO 8601 time (``Z`` or an offset; none means UTC), or a ParameterError naming the fix."""
    if text is None or text == "":
        return None
    cleaned = text.strip()
    if "T" in cleaned and " " in cleaned:
        cleaned = cleaned.replace(" ", "+")  # an unencoded '+' of an offset arrives as a space
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ParameterError(parameter, f"{text!r} is not an ISO 8601 time; use e.g. 2024-08-09T00:05:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_symbols(values: list[str]) -> tuple[str, ...]:
    symbols: list[str] = []
    for value in values:
        for symbol in (s.strip() for s in value.split(",")):
            if not symbol:
                continue
            if not _SYMBOL.match(symbol):
                raise ParameterError(
                    "symbol",
                    f"{symbol!r} is not a symbol; use letters, digits and . _ : / - (up to 32), e.g. BTCUSDT or BHP",
                )
            if symbol not in symbols:
                symbols.append(symbol)
    if not symbols:
        raise ParameterError(
            "symbol",
            "give at least one symbol, e.g. symbol=BTCUSDT (repeat it or separate symbols with commas for several)",
        )
    if len(symbols) > MAX_SYMBOLS:
        raise ParameterError("symbol", f"{len(symbols)} symbols; ask for at most {MAX_SYMBOLS} per request")
    return tuple(symbols)


def parse_exchange(exchange: str | None) -> str | None:
    if exchange is None or exchange == "":
        return None
    if not _EXCHANGE.match(exchange):
        raise ParameterError("exchange", f"{exchange!r} is not an exchange name; use e.g. BINANCE or ASX")
    return exchange.upper()


def parse_window(text: str) -> timedelta:
    match = _WINDOW.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ParameterError(
            "window", f"{text!r} is not a window; use a positive whole number with s, m, h or d, e.g. 90m, 6h or 7d"
        )
    return timedelta(**{_WINDOW_UNITS[match.group(2)]: int(match.group(1))})


def check_order(start: datetime | None, end: datetime | None) -> None:
    if start is not None and end is not None and end <= start:
        raise ParameterError("end", f"end {end.isoformat()} is not after start {start.isoformat()}; swap them")


def micros(moment: datetime) -> int:
    """Microseconds since the epoch: a time as a cursor position."""
    return (moment - EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    return EPOCH + timedelta(microseconds=int(value))


def decode_cursor(text: str | None, query: str, positions: int) -> Cursor | None:
    """The ``cursor`` parameter of a page of ``query`` (None: the first page)."""
    if not text:
        return None
    try:
        return Cursor.decode(text, query, positions)
    except BadCursor as exc:
        raise ParameterError("cursor", str(exc)) from None
