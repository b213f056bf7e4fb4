"""The bundled real Binance recording (data/binance) as trade V2 records, for tests."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

from k2_resources.paths import DATA_DIR
from k2_resources.schemas import TradeV2


def binance_records(symbol: str, days: tuple[str, ...] = ("2024-08-08", "2024-08-09")) -> Iterator[dict]:
    """Every recorded trade of ``symbol`` on ``days`` (CSV order: trade id order), as a V2 record."""
    for day in days:
        with open(DATA_DIR / "binance" / f"{symbol}-trades-{day}.csv") as handle:
            for row in csv.DictReader(handle):
                yield TradeV2(
                    message_id=f"BINANCE-{symbol}-{row['trade_id']}",
                    trade_id=f"BINANCE-{row['trade_id']}",
                    symbol=symbol,
                    exchange="BINANCE",
                    asset_class="crypto",
                    timestamp=datetime.fromtimestamp(int(row["time_ms"]) / 1000, tz=UTC),
                    price=Decimal(row["price"]),
                    quantity=Decimal(row["qty"]),
                    currency="USDT",
                    side="SELL" if row["is_buyer_maker"] == "true" else "BUY",
                    source_sequence=int(row["trade_id"]),
                    ingestion_timestamp=datetime.now(UTC),
                ).to_record()


def first_binance_records(symbol: str, count: int, days: tuple[str, ...] = ("2024-08-08", "2024-08-09")) -> list[dict]:
    """The first ``count`` recorded trades of ``symbol``; fails if the recording has fewer."""
    records = []
    for record in binance_records(symbol, days):
        if len(records) == count:
            break
        records.append(record)
    assert len(records) == count, f"only {len(records)} recorded {symbol} trades"
    return records


def recorded_trades(limit: int) -> list[dict]:
    """``limit`` recorded trades of 2024-08-09 as V2 records: BTCUSDT's, then ETHUSDT's (half each)."""
    return [
        record
        for symbol in ("BTCUSDT", "ETHUSDT")
        for record in first_binance_records(symbol, limit // 2, days=("2024-08-09",))
    ]


def recorded_trades_in_time_order(per_symbol: int = 1500) -> list[dict]:
    """The first ``per_symbol`` recorded BTCUSDT and ETHUSDT trades of 2024-08-09, merged in time order."""
    records = [
        record
        for symbol in ("BTCUSDT", "ETHUSDT")
        for record in first_binance_records(symbol, per_symbol, days=("2024-08-09",))
    ]
    return sorted(records, key=lambda r: (r["timestamp"], r["symbol"]))
