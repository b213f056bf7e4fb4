"""Load shedding by symbol tier: which work each degradation level postpones.

Symbols fall into three tiers: tier 1 (the top 20 by volume), tier 2 (the top 100) and tier 3
(the rest). Shedding never drops data: a deferred symbol's offset range is recorded and written
to Iceberg once the level falls again. This module is pure logic (no I/O), so the stream sensor
and the micro-batch code can ask it cheaply for every record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from k2_resources.degradation.levels import DegradationLevel
from k2_resources.errors import K2Error

T = TypeVar("T")

# The twenty largest ASX listings around March 2014 (the period of the bundled ASX sample data).
ASX_TOP20: tuple[str, ...] = (
    "BHP", "CBA", "WBC", "ANZ", "NAB", "TLS", "WES", "RIO", "WOW", "CSL",
    "WPL", "NCM", "SUN", "MQG", "QBE", "AMP", "ORG", "BXB", "SCG", "IAG",
)  # fmt: skip

DEFAULT_TIER1: tuple[str, ...] = ("BTCUSDT", "ETHUSDT", *ASX_TOP20)

# Large but not top names: the next crypto pairs by typical volume and the next ASX listings.
DEFAULT_TIER2: tuple[str, ...] = (
    "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT", "DOGEUSDT", "TRXUSDT", "LTCUSDT", "LINKUSDT",
    "DOTUSDT", "AVAXUSDT", "BCHUSDT", "MATICUSDT", "ATOMUSDT", "ETCUSDT", "XLMUSDT", "UNIUSDT",
    "FILUSDT", "NEARUSDT", "APTUSDT", "ARBUSDT", "OPUSDT", "ETHBTC", "BNBBTC", "SOLBTC",
    "STO", "FMG", "AMC", "TCL", "WOR", "CCL", "ASX", "GPT", "SGP", "AGL", "ORI", "CWN",
    "SYD", "GMG", "LLC", "APA", "CPU", "TAH", "ILU", "OSH", "RHC", "COH", "SHL", "ALQ",
    "BLD", "JHX", "IPL", "BSL", "QAN", "TTS", "MGR", "DXS", "CFX", "IOF", "BOQ", "BEN",
)  # fmt: skip

TIER1_SIZE = 20
TIER2_SIZE = 100


def _normalise(symbol: str) -> str:
    return symbol.strip().upper()


@dataclass(frozen=True, init=False)
class LoadShedder:
    """Decides, per degradation level, what the stream path skips, defers, spills or stops.

    Tier 1 and tier 2 are explicit symbol sets; every other symbol is tier 3. Build one from
    configured lists (``LoadShedder(tier1=..., tier2=...)``) or from recent volumes
    (``LoadShedder.from_volumes({...})``).
    """

    tier1: frozenset[str]
    tier2: frozenset[str]

    def __init__(self, tier1: Iterable[str] = DEFAULT_TIER1, tier2: Iterable[str] = DEFAULT_TIER2) -> None:
        t1 = frozenset(_normalise(s) for s in tier1)
        t2 = frozenset(_normalise(s) for s in tier2) - t1
        object.__setattr__(self, "tier1", t1)
        object.__setattr__(self, "tier2", t2)

    @classmethod
    def from_volumes(
        cls, volumes: Mapping[str, float], tier1_size: int = TIER1_SIZE, tier2_size: int = TIER2_SIZE
    ) -> LoadShedder:
        """Tiers from recent per-symbol volume: the top ``tier1_size`` are tier 1, the rest of the top
        ``tier2_size`` tier 2.

        Ties are broken by symbol name so that the same volumes always give the same tiers.
        """
        if not 0 < tier1_size <= tier2_size:
            raise K2Error(
                f"load-shedding tier sizes must satisfy 0 < tier1_size <= tier2_size, got {tier1_size}, {tier2_size}"
            )
        bad = {s: v for s, v in volumes.items() if v is None or v < 0}
        if bad:
            raise K2Error(f"symbol volumes must be >= 0, got {bad}; pass traded quantity or notional per symbol")
        ranked = sorted(volumes, key=lambda s: (-float(volumes[s]), _normalise(s)))
        return cls(tier1=ranked[:tier1_size], tier2=ranked[tier1_size:tier2_size])

    def tier(self, symbol: str) -> int:
        """1, 2 or 3 for ``symbol`` (case-insensitive)."""
        key = _normalise(symbol)
        if key in self.tier1:
            return 1
        if key in self.tier2:
            return 2
        return 3

    @staticmethod
    def skip_enrichment(level: DegradationLevel | int) -> bool:
        """SOFT and above: write normalised records without enrichment."""
        return DegradationLevel(level) >= DegradationLevel.SOFT

    def should_defer(self, symbol: str, level: DegradationLevel | int) -> bool:
        """GRACEFUL and above: tier-3 symbols are deferred (recorded, processed on recovery)."""
        return DegradationLevel(level) >= DegradationLevel.GRACEFUL and self.tier(symbol) == 3

    @staticmethod
    def spill(level: DegradationLevel | int) -> bool:
        """AGGRESSIVE and above: raw batches go to local Parquet (SpillStore) instead of Iceberg."""
        return DegradationLevel(level) >= DegradationLevel.AGGRESSIVE

    @staticmethod
    def stop_scheduling(level: DegradationLevel | int) -> bool:
        """CIRCUIT_BREAK: no new micro-batch runs are requested."""
        return DegradationLevel(level) >= DegradationLevel.CIRCUIT_BREAK

    def split(
        self, records: Iterable[T], level: DegradationLevel | int, symbol_of: Callable[[T], str] | None = None
    ) -> tuple[list[T], list[T]]:
        """(kept, deferred) records at ``level``; ``symbol_of`` reads a record's symbol (default ``r["symbol"]``)."""
        get_symbol: Callable[[T], str] = symbol_of or (lambda record: record["symbol"])  # type: ignore[index]
        kept: list[T] = []
        deferred: list[T] = []
        for record in records:
            (deferred if self.should_defer(get_symbol(record), level) else kept).append(record)
        return kept, deferred

    def tiers(self) -> dict[str, list[str]]:
        """The explicit tiers as sorted lists (for check metadata and the UI)."""
        return {"tier1": sorted(self.tier1), "tier2": sorted(self.tier2)}


def tiers_from_config(tier1: Sequence[str] | None, tier2: Sequence[str] | None) -> LoadShedder:
    """A shedder from optional configured lists; a missing list falls back to its default."""
    return LoadShedder(
        tier1=DEFAULT_TIER1 if tier1 is None else tier1,
        tier2=DEFAULT_TIER2 if tier2 is None else tier2,
    )
