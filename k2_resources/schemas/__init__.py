"""The V2 data contracts: Avro schemas for the wire, pydantic models for the edges."""

from k2_resources.schemas.avro import (
    QUOTE_V2,
    TRADE_V2,
    decode_quote,
    decode_trade,
    encode_quote,
    encode_trade,
)
from k2_resources.schemas.models import AssetClass, QuoteV2, TradeSide, TradeV2

__all__ = [
    "QUOTE_V2",
    "TRADE_V2",
    "AssetClass",
    "QuoteV2",
    "TradeSide",
    "TradeV2",
    "decode_quote",
    "decode_trade",
    "encode_quote",
    "encode_trade",
]
