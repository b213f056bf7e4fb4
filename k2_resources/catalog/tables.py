"""Iceberg table definitions of K2: schemas, partition specs and sort orders.

``market.trades`` and ``market.quotes`` carry the V2 columns, partitioned by
day(timestamp) and exchange and sorted by symbol then timestamp, so a query for one symbol
on one day opens one partition and skips most row groups. ``market.ohlcv`` holds the bars of
every interval (k2_resources.analytics.ohlcv), partitioned by interval, exchange and month;
``market.live_bars`` the 1-minute bars of the last hours including the Kafka tail
(k2_resources.analytics.live_bars), replaced whole each time.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table.sorting import SortField, SortOrder
from pyiceberg.transforms import DayTransform, IdentityTransform, MonthTransform
from pyiceberg.types import (
    DecimalType,
    ListType,
    LongType,
    MapType,
    NestedField,
    StringType,
    TimestamptzType,
)

NAMESPACE = "market"
PRICE = DecimalType(18, 8)
VOLUME = DecimalType(38, 8)

TRADES_SCHEMA = Schema(
    NestedField(1, "message_id", StringType(), required=True),
    NestedField(2, "trade_id", StringType(), required=True),
    NestedField(3, "symbol", StringType(), required=True),
    NestedField(4, "exchange", StringType(), required=True),
    NestedField(5, "asset_class", StringType(), required=True),
    NestedField(6, "timestamp", TimestamptzType(), required=True, doc="exchange time, UTC"),
    NestedField(7, "price", PRICE, required=True),
    NestedField(8, "quantity", PRICE, required=True),
    NestedField(9, "currency", StringType(), required=True),
    NestedField(10, "side", StringType(), required=True, doc="aggressor side: BUY, SELL, SELL_SHORT, UNKNOWN"),
    NestedField(11, "trade_conditions", ListType(16, StringType(), element_required=True), required=False),
    NestedField(12, "source_sequence", LongType(), required=False),
    NestedField(13, "ingestion_timestamp", TimestamptzType(), required=True),
    NestedField(14, "platform_sequence", LongType(), required=False),
    NestedField(15, "vendor_data", MapType(17, StringType(), 18, StringType(), value_required=False), required=False),
)

QUOTES_SCHEMA = Schema(
    NestedField(1, "message_id", StringType(), required=True),
    NestedField(2, "quote_id", StringType(), required=True),
    NestedField(3, "symbol", StringType(), required=True),
    NestedField(4, "exchange", StringType(), required=True),
    NestedField(5, "asset_class", StringType(), required=True),
    NestedField(6, "timestamp", TimestamptzType(), required=True),
    NestedField(7, "bid_price", PRICE, required=False, doc="null: empty bid side"),
    NestedField(8, "bid_quantity", PRICE, required=False),
    NestedField(9, "ask_price", PRICE, required=False, doc="null: empty ask side"),
    NestedField(10, "ask_quantity", PRICE, required=False),
    NestedField(11, "currency", StringType(), required=True),
    NestedField(12, "source_sequence", LongType(), required=False),
    NestedField(13, "ingestion_timestamp", TimestamptzType(), required=True),
    NestedField(14, "platform_sequence", LongType(), required=False),
    # Nested ids follow the top-level ones, as the catalog assigns them on create.
    NestedField(15, "vendor_data", MapType(16, StringType(), 17, StringType(), value_required=False), required=False),
)

DEAD_LETTERS_SCHEMA = Schema(
    NestedField(1, "source", StringType(), required=True, doc="e.g. asx_trades, asx_quotes"),
    NestedField(2, "partition_key", StringType(), required=False, doc="the asset partition the row belonged to"),
    NestedField(3, "file", StringType(), required=False),
    NestedField(4, "line_number", LongType(), required=False, doc="1-based line in the file"),
    NestedField(5, "raw", StringType(), required=True, doc="the input exactly as read"),
    NestedField(6, "reason", StringType(), required=True),
    NestedField(7, "ingestion_timestamp", TimestamptzType(), required=True),
)

OHLCV_SCHEMA = Schema(
    NestedField(1, "interval", StringType(), required=True, doc="1m, 5m, 1h or 1d"),
    NestedField(2, "symbol", StringType(), required=True),
    NestedField(3, "exchange", StringType(), required=True),
    NestedField(4, "bucket_start", TimestamptzType(), required=True, doc="inclusive"),
    NestedField(5, "bucket_end", TimestamptzType(), required=True, doc="exclusive"),
    NestedField(6, "open", PRICE, required=True),
    NestedField(7, "high", PRICE, required=True),
    NestedField(8, "low", PRICE, required=True),
    NestedField(9, "close", PRICE, required=True),
    NestedField(10, "volume", VOLUME, required=True, doc="sum of quantity"),
    NestedField(11, "notional", VOLUME, required=True, doc="sum of price * quantity"),
    NestedField(12, "vwap", PRICE, required=True, doc="notional / volume"),
    NestedField(13, "trade_count", LongType(), required=True),
    NestedField(14, "first_trade_at", TimestamptzType(), required=True),
    NestedField(15, "last_trade_at", TimestamptzType(), required=True),
    NestedField(16, "computed_at", TimestamptzType(), required=True),
)

_MARKET_SPEC = PartitionSpec(
    PartitionField(source_id=6, field_id=1000, transform=DayTransform(), name="timestamp_day"),
    PartitionField(source_id=4, field_id=1001, transform=IdentityTransform(), name="exchange"),
)
_MARKET_SORT = SortOrder(
    SortField(source_id=3, transform=IdentityTransform()),
    SortField(source_id=6, transform=IdentityTransform()),
)


@dataclass(frozen=True)
class TableDefinition:
    """Everything needed to create one K2 table."""

    name: str
    schema: Schema
    partition_spec: PartitionSpec
    sort_order: SortOrder

    @property
    def identifier(self) -> str:
        return f"{NAMESPACE}.{self.name}"

    def arrow_schema(self) -> pa.Schema:
        """The Arrow schema of the table's rows, without Iceberg field ids: pyiceberg then matches
        columns to the table by name. A REST catalog may number nested fields its own way when it
        creates a table (SeaweedFS numbers depth-first: trades' list element becomes 12, not 16), and
        ids taken from this definition would then not match the table's."""
        return schema_to_pyarrow(self.schema, include_field_ids=False)


TRADES = TableDefinition("trades", TRADES_SCHEMA, _MARKET_SPEC, _MARKET_SORT)
QUOTES = TableDefinition("quotes", QUOTES_SCHEMA, _MARKET_SPEC, _MARKET_SORT)
DEAD_LETTERS = TableDefinition(
    "dead_letters",
    DEAD_LETTERS_SCHEMA,
    PartitionSpec(PartitionField(source_id=1, field_id=1000, transform=IdentityTransform(), name="source")),
    SortOrder(),
)
# One table for every interval, so one commit replaces all intervals of the buckets a run recomputes.
OHLCV = TableDefinition(
    "ohlcv",
    OHLCV_SCHEMA,
    PartitionSpec(
        PartitionField(source_id=1, field_id=1000, transform=IdentityTransform(), name="interval"),
        PartitionField(source_id=3, field_id=1001, transform=IdentityTransform(), name="exchange"),
        PartitionField(source_id=4, field_id=1002, transform=MonthTransform(), name="bucket_start_month"),
    ),
    SortOrder(
        SortField(source_id=2, transform=IdentityTransform()), SortField(source_id=4, transform=IdentityTransform())
    ),
)
# The 1-minute bars of the last hours of Binance trades, Kafka tail included (binance_live_bars):
# small, and replaced whole by each materialisation.
LIVE_BARS = TableDefinition(
    "live_bars",
    OHLCV_SCHEMA,
    PartitionSpec(),
    SortOrder(
        SortField(source_id=2, transform=IdentityTransform()), SortField(source_id=4, transform=IdentityTransform())
    ),
)
ALL_TABLES = (TRADES, QUOTES, DEAD_LETTERS, OHLCV, LIVE_BARS)
