"""Binance combined-stream trade messages to trade V2 records.

A combined-stream frame looks like::

    {"stream": "btcusdt@trade",
     "data": {"e": "trade", "E": 1723161600331, "s": "BTCUSDT", "t": 3735692997,
              "p": "61686.00000000", "q": "0.00705000", "T": 1723161600330, "m": false, "M": true}}

Mapping (see the design brief, "Data contracts"):

- trade_id ``BINANCE-<t>``; message_id ``BINANCE-<SYMBOL>-<t>`` (deterministic: the same trade
  always gets the same id, so downstream dedupe works; trade ids are only unique per symbol).
- timestamp from ``T`` (trade time, epoch ms, UTC); currency is the symbol's quote asset.
- side: ``m`` true means the buyer is the maker, so the seller aggressed: SELL; else BUY.
- price and quantity are parsed from the decimal strings, never through float.
- source_sequence = ``t``; ``E``, ``b``, ``a``, ``M``, ``m``, the stream name and any other field
  not in V2 go to vendor_data as strings.

Anything that does not fit raises :class:`MalformedTradeMessage` with a short ``code`` and a
reason; the streamer sends such frames to the dead-letter topic.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from k2_resources.binance.errors import MalformedTradeMessage
from k2_resources.schemas import TradeV2

EXCHANGE = "BINANCE"
# Quote assets Binance spot lists, longest first so that e.g. FDUSD wins over USD.
QUOTE_ASSETS = (
    "FDUSD",
    "USDT",
    "USDC",
    "TUSD",
    "BUSD",
    "USDP",
    "DAI",
    "TRY",
    "EUR",
    "GBP",
    "BRL",
    "JPY",
    "AUD",
    "BTC",
    "ETH",
    "BNB",
    "XRP",
    "TRX",
    "DOGE",
)
_MAPPED_FIELDS = {"e", "s", "t", "p", "q", "T"}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def quote_asset(symbol: str) -> str:
    """The quote currency of a Binance spot symbol (``BTCUSDT`` -> ``USDT``)."""
    for asset in QUOTE_ASSETS:
        if symbol.endswith(asset) and len(symbol) > len(asset):
            return asset
    raise MalformedTradeMessage(
        "unknown_quote_asset",
        f"symbol {symbol!r} does not end with a known quote asset ({', '.join(QUOTE_ASSETS)}); "
        "add it to QUOTE_ASSETS in k2_resources/binance/normalise.py",
    )


def parse_frame(raw: str | bytes) -> dict[str, Any]:
    """The JSON object of one WebSocket frame."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedTradeMessage("invalid_json", f"frame is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise MalformedTradeMessage("invalid_json", "frame nests JSON too deeply to parse") from exc
    if not isinstance(message, dict):
        raise MalformedTradeMessage("not_an_object", f"frame is a JSON {type(message).__name__}, not an object")
    return message


def _field(data: dict[str, Any], name: str) -> Any:
    if name not in data or data[name] is None:
        raise MalformedTradeMessage("missing_field", f"trade message has no field {name!r}")
    return data[name]


def _decimal(data: dict[str, Any], name: str) -> Decimal:
    value = _field(data, name)
    if not isinstance(value, str):
        raise MalformedTradeMessage("bad_number", f"field {name!r} must be a decimal string, got {value!r}")
    try:
        number = Decimal(value)
    except InvalidOperation as exc:
        raise MalformedTradeMessage("bad_number", f"field {name!r}={value!r} is not a decimal number") from exc
    if not number.is_finite() or number <= 0:
        raise MalformedTradeMessage("bad_number", f"field {name!r}={value!r} must be a finite number above 0")
    return number


def _integer(data: dict[str, Any], name: str) -> int:
    value = _field(data, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MalformedTradeMessage("bad_number", f"field {name!r} must be a non-negative integer, got {value!r}")
    return value


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def _trade_time(millis: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=millis)


def normalise_trade(message: str | bytes | dict[str, Any], ingestion_time: datetime | None = None) -> dict[str, Any]:
    """One combined-stream (or raw-stream) trade message as a trade V2 record dict.

    Raises MalformedTradeMessage (code and reason) for anything that is not a valid trade.
    """
    if not isinstance(message, dict):
        message = parse_frame(message)
    stream = message.get("stream")
    data = message.get("data", message)
    if not isinstance(data, dict):
        raise MalformedTradeMessage("not_an_object", "field 'data' is not a JSON object")
    event = data.get("e")
    if event != "trade":
        raise MalformedTradeMessage("unexpected_event", f"event type {event!r} is not 'trade' (stream {stream!r})")
    symbol = _field(data, "s")
    if not isinstance(symbol, str) or not symbol.isascii() or not symbol.isalnum():
        raise MalformedTradeMessage("bad_symbol", f"field 's'={symbol!r} is not a Binance symbol")
    symbol = symbol.upper()
    if stream is not None and stream != f"{symbol.lower()}@trade":
        raise MalformedTradeMessage("stream_mismatch", f"stream {stream!r} does not carry symbol {symbol}")
    trade_number = _integer(data, "t")
    trade_time = _integer(data, "T")
    price = _decimal(data, "p")
    quantity = _decimal(data, "q")
    buyer_is_maker = data.get("m")
    if not isinstance(buyer_is_maker, bool):
        raise MalformedTradeMessage(
            "missing_field" if buyer_is_maker is None else "bad_flag",
            f"field 'm' must be true or false, got {buyer_is_maker!r}",
        )

    try:
        vendor_data = {key: _text(value) for key, value in data.items() if key not in _MAPPED_FIELDS}
    except (ValueError, RecursionError) as exc:
        raise MalformedTradeMessage(
            "invalid_value",
            f"an extra field of trade {symbol} {trade_number} cannot be kept in vendor_data ({type(exc).__name__})",
        ) from exc
    if stream is not None:
        vendor_data["stream"] = str(stream)
    try:
        trade = TradeV2(
            message_id=f"{EXCHANGE}-{symbol}-{trade_number}",
            trade_id=f"{EXCHANGE}-{trade_number}",
            symbol=symbol,
            exchange=EXCHANGE,
            asset_class="crypto",
            timestamp=_trade_time(trade_time),
            price=price,
            quantity=quantity,
            currency=quote_asset(symbol),
            side="SELL" if buyer_is_maker else "BUY",
            trade_conditions=[],
            source_sequence=trade_number,
            ingestion_timestamp=ingestion_time or datetime.now(UTC),
            vendor_data=vendor_data,
        )
    except (ValidationError, OverflowError) as exc:
        problems = (
            "; ".join(f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}" for error in exc.errors())
            if isinstance(exc, ValidationError)
            else str(exc)
        )
        raise MalformedTradeMessage(
            "invalid_value", f"trade {symbol} {trade_number} does not fit V2 ({problems})"
        ) from exc
    return trade.to_record()
