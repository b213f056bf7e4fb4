"""pydantic models of the V2 records, used to validate data where it enters K2."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from enum import Enum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

# decimal(18, 8): 10 integer digits, 8 fractional digits.
Decimal18_8 = Annotated[Decimal, Field(max_digits=18, decimal_places=8)]


class AssetClass(str, Enum):
    EQUITIES = "equities"
    CRYPTO = "crypto"
    FUTURES = "futures"
    OPTIONS = "options"


class TradeSide(str, Enum):
    BUY = "BUY"
    SELL = "SELL"
    SELL_SHORT = "SELL_SHORT"
    UNKNOWN = "UNKNOWN"


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("timestamp must be timezone-aware (UTC)")
    return value.astimezone(UTC)


class _Envelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    message_id: str = Field(min_length=1)
    symbol: str = Field(min_length=1)
    exchange: str = Field(min_length=1)
    asset_class: AssetClass
    timestamp: datetime
    currency: str = Field(min_length=3, max_length=8)
    source_sequence: int | None = None
    ingestion_timestamp: datetime
    platform_sequence: int | None = None
    vendor_data: dict[str, str] | None = None

    _utc_timestamps = field_validator("timestamp", "ingestion_timestamp")(_utc)

    def to_record(self) -> dict[str, Any]:
        """Plain values in the shape the Avro encoder and the Iceberg writer take."""
        record = self.model_dump()
        for key, value in record.items():
            if isinstance(value, Enum):
                record[key] = value.value
        return record


class TradeV2(_Envelope):
    """A trade as K2 stores it; price and quantity are exact decimals."""

    trade_id: str = Field(min_length=1)
    price: Decimal18_8 = Field(gt=0)
    quantity: Decimal18_8 = Field(gt=0)
    side: TradeSide = TradeSide.UNKNOWN
    trade_conditions: list[str] = Field(default_factory=list)


class QuoteV2(_Envelope):
    """A best bid/offer; a None price means that side of the book is empty."""

    quote_id: str = Field(min_length=1)
    bid_price: Decimal18_8 | None = Field(default=None, gt=0)
    bid_quantity: Decimal18_8 | None = Field(default=None, ge=0)
    ask_price: Decimal18_8 | None = Field(default=None, gt=0)
    ask_quantity: Decimal18_8 | None = Field(default=None, ge=0)
