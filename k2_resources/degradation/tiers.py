"""Load-shedding tiers from traded volume: rank symbols by 24-hour notional, store the ranking,
read the newest one back cheaply.

The ranking is a small JSON file (default ``K2_HOME/degradation/symbol_tiers.json``), written
to a temporary name in the same folder and renamed into place, so a reader sees a whole ranking
or the previous one, never half a file. It is written by the ``symbol_tiers`` asset and read by
``DegradationResource.load_shedder()`` in every micro-batch; reading it costs one ``stat`` while
the file is unchanged (the parsed ranking is cached by path, modification time and size).

Notional is price x quantity summed in the trade's own currency (exact decimals). Symbols of
different currencies (AUD for ASX, USDT for Binance) are ranked on the raw numbers, without FX
conversion: the tiers only need the order of magnitude. Ties are broken by symbol name, so the
same volumes always give the same tiers.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import polars as pl

from k2_resources.degradation.shedding import TIER1_SIZE, TIER2_SIZE, LoadShedder
from k2_resources.errors import K2Error
from k2_resources.paths import state_dir

RANKING_WINDOW = timedelta(hours=24)
RANKING_VERSION = 1
RANKING_FILE_NAME = "symbol_tiers.json"


def default_ranking_path() -> Path:
    """``K2_HOME/degradation/symbol_tiers.json`` (the folder is created)."""
    return state_dir("degradation") / RANKING_FILE_NAME


@dataclass(frozen=True)
class RankedSymbol:
    """One symbol's place in the ranking: 1-based rank, tier, notional and trade count in its window."""

    rank: int
    symbol: str
    exchange: str
    tier: int
    notional: Decimal
    trades: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "symbol": self.symbol,
            "exchange": self.exchange,
            "tier": self.tier,
            "notional": format(self.notional, "f"),
            "trades": self.trades,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankedSymbol:
        return cls(
            int(data["rank"]),
            str(data["symbol"]),
            str(data["exchange"]),
            int(data["tier"]),
            Decimal(str(data["notional"])),
            int(data["trades"]),
        )


@dataclass(frozen=True)
class SymbolRanking:
    """A ranking of symbols by traded notional, the windows it covers and where it came from."""

    symbols: tuple[RankedSymbol, ...]
    computed_at: datetime
    windows: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)  # exchange -> [start, end)
    source_snapshot_id: int | None = None
    tier1_size: int = TIER1_SIZE
    tier2_size: int = TIER2_SIZE

    def tier_symbols(self, tier: int) -> list[str]:
        return [s.symbol for s in self.symbols if s.tier == tier]

    def shedder(self) -> LoadShedder:
        """The LoadShedder of this ranking: tier 1 and 2 as ranked, every other symbol tier 3."""
        return LoadShedder(tier1=self.tier_symbols(1), tier2=self.tier_symbols(2))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": RANKING_VERSION,
            "computed_at": self.computed_at.isoformat(),
            "source_snapshot_id": self.source_snapshot_id,
            "tier1_size": self.tier1_size,
            "tier2_size": self.tier2_size,
            "windows": {
                exchange: [start.isoformat(), end.isoformat()]
                for exchange, (start, end) in sorted(self.windows.items())
            },
            "symbols": [s.to_dict() for s in self.symbols],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SymbolRanking:
        if data.get("version") != RANKING_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {RANKING_VERSION}")
        return cls(
            symbols=tuple(RankedSymbol.from_dict(s) for s in data["symbols"]),
            computed_at=datetime.fromisoformat(data["computed_at"]),
            windows={
                exchange: (datetime.fromisoformat(start), datetime.fromisoformat(end))
                for exchange, (start, end) in data.get("windows", {}).items()
            },
            source_snapshot_id=data.get("source_snapshot_id"),
            tier1_size=int(data.get("tier1_size", TIER1_SIZE)),
            tier2_size=int(data.get("tier2_size", TIER2_SIZE)),
        )


def rank_symbols(
    trades: pl.DataFrame, tier1_size: int = TIER1_SIZE, tier2_size: int = TIER2_SIZE
) -> list[RankedSymbol]:
    """Symbols of a trades frame (symbol, exchange, price, quantity) ranked by summed price x quantity.

    The top ``tier1_size`` are tier 1, the rest of the top ``tier2_size`` tier 2, the others tier 3;
    equal notionals are ordered by symbol name.
    """
    if not 0 < tier1_size <= tier2_size:
        raise K2Error(f"tier sizes must satisfy 0 < tier1_size <= tier2_size, got {tier1_size}, {tier2_size}")
    missing = {"symbol", "exchange", "price", "quantity"} - set(trades.columns)
    if missing:
        raise K2Error(f"ranking needs the trade columns {sorted(missing)}; read symbol, exchange, price and quantity")
    if trades.is_empty():
        return []
    per_symbol = trades.group_by("symbol").agg(
        (pl.col("price").cast(pl.Decimal(18, 8)) * pl.col("quantity").cast(pl.Decimal(18, 8))).sum().alias("notional"),
        pl.len().alias("trades"),
        pl.col("exchange").min().alias("exchange"),
    )
    rows = sorted(per_symbol.iter_rows(named=True), key=lambda r: (-Decimal(r["notional"]), r["symbol"]))
    ranked = []
    for rank, row in enumerate(rows, start=1):
        tier = 1 if rank <= tier1_size else 2 if rank <= tier2_size else 3
        ranked.append(
            RankedSymbol(rank, row["symbol"], row["exchange"], tier, Decimal(row["notional"]), int(row["trades"]))
        )
    return ranked


def ranking_from_trades(
    trades: pl.DataFrame,
    windows: dict[str, tuple[datetime, datetime]],
    source_snapshot_id: int | None,
    *,
    tier1_size: int = TIER1_SIZE,
    tier2_size: int = TIER2_SIZE,
    now: datetime | None = None,
) -> SymbolRanking:
    """The ranking of ``trades`` read from snapshot ``source_snapshot_id`` of ``market.trades`` over
    each exchange's ``windows`` (see :func:`k2_resources.trades.recent.recent_trades`); a table
    without a snapshot (``source_snapshot_id`` None) gives an empty ranking.

    The read lives in the trades package so this module never reads Iceberg (the edge runs one
    way: readers know nothing of degradation, and degradation is handed frames).
    """
    computed_at = now or datetime.now(UTC)
    if source_snapshot_id is None:
        return SymbolRanking((), computed_at, {}, None, tier1_size, tier2_size)
    return SymbolRanking(
        tuple(rank_symbols(trades, tier1_size, tier2_size)),
        computed_at,
        windows,
        source_snapshot_id,
        tier1_size,
        tier2_size,
    )


def write_ranking(ranking: SymbolRanking, path: Path | str | None = None) -> Path:
    """Write ``ranking`` atomically (temporary file in the same folder, fsync, rename); returns the path."""
    target = Path(path) if path is not None else default_ranking_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(ranking.to_dict(), handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def read_ranking(path: Path | str | None = None) -> SymbolRanking | None:
    """The ranking stored at ``path`` (default K2_HOME's), or None when there is none."""
    target = Path(path) if path is not None else default_ranking_path()
    try:
        text = target.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        return SymbolRanking.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as error:
        raise K2Error(
            f"the symbol-tier ranking {target} is unreadable ({error}); delete it and materialise "
            "the symbol_tiers asset again (until then the static tier lists are used once it is gone)"
        ) from error


_cache_lock = threading.Lock()
_cache: dict[Path, tuple[tuple[int, int, int], SymbolRanking, LoadShedder]] = {}


def newest_ranked_shedder(path: Path | str | None = None) -> tuple[SymbolRanking, LoadShedder] | None:
    """The stored ranking and its LoadShedder, parsed once per version of the file (inode, mtime,
    size; a rename-into-place always makes a new inode), or None when there is no ranking.

    Cheap enough for every micro-batch and sensor tick: an unchanged file costs one ``stat``.
    """
    target = Path(path) if path is not None else default_ranking_path()
    try:
        status = target.stat()
    except FileNotFoundError:
        with _cache_lock:
            _cache.pop(target, None)
        return None
    version = (status.st_ino, status.st_mtime_ns, status.st_size)
    with _cache_lock:
        cached = _cache.get(target)
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    ranking = read_ranking(target)
    if ranking is None:
        return None
    shedder = ranking.shedder()
    with _cache_lock:
        _cache[target] = (version, ranking, shedder)
    return ranking, shedder


def newest_ranking(path: Path | str | None = None) -> SymbolRanking | None:
    """The stored ranking (cached like :func:`newest_ranked_shedder`), or None."""
    found = newest_ranked_shedder(path)
    return found[0] if found else None
