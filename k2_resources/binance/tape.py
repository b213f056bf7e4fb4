"""The recorded Binance trades (data/binance) as an endless tape, shared by the recording server's
WebSocket stream and its REST history (k2_resources.binance.rest_history)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from k2_resources.errors import K2Error
from k2_resources.paths import DATA_DIR

RECORDING_DIR = DATA_DIR / "binance"


@dataclass(frozen=True, slots=True)
class RecordedTrade:
    """One row of a data/binance/<SYMBOL>-trades-<date>.csv file, strings kept as recorded."""

    symbol: str
    trade_id: int
    price: str
    quantity: str
    time_ms: int
    buyer_is_maker: bool


def load_recorded_trades(directory: Path = RECORDING_DIR) -> list[RecordedTrade]:
    """All recorded trades in the folder, merged by trade time (then symbol, then id)."""
    files = sorted(directory.glob("*-trades-*.csv"))
    if not files:
        raise K2Error(
            f"no Binance recordings (*-trades-*.csv) in {directory}; "
            "copy them from ../shared/data/binance (see data/binance/SOURCE.md)"
        )
    trades: list[RecordedTrade] = []
    for path in files:
        symbol = path.name.split("-", 1)[0].upper()
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                trades.append(
                    RecordedTrade(
                        symbol,
                        int(row["trade_id"]),
                        row["price"],
                        row["qty"],
                        int(row["time_ms"]),
                        row["is_buyer_maker"] == "true",
                    )
                )
    trades.sort(key=lambda trade: (trade.time_ms, trade.symbol, trade.trade_id))
    return trades


class Tape:
    """The recorded trades as an endless, loop-shifted sequence of combined-stream frames."""

    def __init__(self, trades: list[RecordedTrade], max_pause_ms: int = 1000) -> None:
        if not trades:
            raise K2Error("the recording server's tape is empty: no recorded trades to serve")
        self.trades = trades
        offsets = [0]
        for previous, current in zip(trades, trades[1:]):
            offsets.append(offsets[-1] + min(current.time_ms - previous.time_ms, max_pause_ms))
        self.offsets_ms = offsets  # compressed timeline: pacing and the "now" time base
        self.compressed_span_ms = offsets[-1] + 1
        self.recorded_span_ms = trades[-1].time_ms - trades[0].time_ms + 1
        self.anchor_ms = trades[0].time_ms
        ids: dict[str, list[int]] = {}
        for trade in trades:
            ids.setdefault(trade.symbol, []).append(trade.trade_id)
        self.id_span = {symbol: max(values) - min(values) + 1 for symbol, values in ids.items()}
        self.symbols = sorted(ids)

    def view(self, symbols: set[str]) -> list[int]:
        """Indices of the trades of these symbols, in tape order."""
        return [index for index, trade in enumerate(self.trades) if trade.symbol in symbols]

    def time_ms(self, global_index: int, lap: int, time_base: str) -> int:
        """The trade time sent for a trade of the tape in a given lap (see RecordingServer)."""
        if time_base == "now":
            return self.anchor_ms + lap * self.compressed_span_ms + self.offsets_ms[global_index]
        return self.trades[global_index].time_ms + lap * self.recorded_span_ms
