"""Synthetic one-second batches of Binance trades for the table-health tests and the soak benchmark."""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

SYMBOLS = (("BTCUSDT", "ETHUSDT"), ("SOLUSDT", "BNBUSDT"), ("XRPUSDT", "DOGEUSDT"))


def second_of_trades(partition: int, first_offset: int, count: int, second: datetime) -> list[dict]:
    """``count`` trade records of Kafka ``partition`` from ``first_offset``, spread over one second."""
    symbols = SYMBOLS[partition % len(SYMBOLS)]
    rows = []
    for index in range(count):
        offset = first_offset + index
        moment = second + timedelta(microseconds=index * 1_000_000 // max(count, 1))
        rows.append(
            {
                "message_id": f"BINANCE-{partition}-{offset}",
                "trade_id": f"BINANCE-{partition}-{offset}",
                "symbol": symbols[index % len(symbols)],
                "exchange": "BINANCE",
                "asset_class": "crypto",
                "timestamp": moment,
                "price": Decimal("61000.5") + Decimal(offset % 997) / 100,
                "quantity": Decimal("0.00100000"),
                "currency": "USDT",
                "side": ("BUY", "SELL")[offset % 2],
                "trade_conditions": [],
                "source_sequence": offset,
                "ingestion_timestamp": moment,
                "platform_sequence": offset,
                "vendor_data": None,
            }
        )
    return rows
