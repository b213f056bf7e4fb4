"""LoadShedder: symbol tiers and what each degradation level skips, defers, spills or stops."""

from __future__ import annotations

import pytest

from k2_resources.degradation.levels import DegradationLevel as L
from k2_resources.degradation.shedding import ASX_TOP20, DEFAULT_TIER1, LoadShedder, tiers_from_config
from k2_resources.errors import K2Error


def test_default_tier1_holds_btc_eth_and_the_asx_top_20() -> None:
    shedder = LoadShedder()
    assert len(ASX_TOP20) == 20 and len(set(ASX_TOP20)) == 20
    for symbol in ("BTCUSDT", "ETHUSDT", "BHP", "RIO", "CBA", "WBC", "NAB", "ANZ", "CSL"):
        assert shedder.tier(symbol) == 1, symbol
    assert shedder.tier("btcusdt ") == 1  # case and whitespace do not matter
    assert shedder.tier("SOLUSDT") == 2
    assert shedder.tier("MWR") == 3  # a small ASX listing from the sample data
    assert shedder.tier("DVN") == 3


@pytest.mark.parametrize(
    ("level", "skip", "defer_tier3", "defer_tier2", "spill", "stop"),
    [
        (L.NORMAL, False, False, False, False, False),
        (L.SOFT, True, False, False, False, False),
        (L.GRACEFUL, True, True, False, False, False),
        (L.AGGRESSIVE, True, True, False, True, False),
        (L.CIRCUIT_BREAK, True, True, False, True, True),
    ],
)
def test_behaviour_per_level(level, skip, defer_tier3, defer_tier2, spill, stop) -> None:
    shedder = LoadShedder()
    assert shedder.skip_enrichment(level) is skip
    assert shedder.should_defer("MWR", level) is defer_tier3
    assert shedder.should_defer("SOLUSDT", level) is defer_tier2
    assert shedder.should_defer("BTCUSDT", level) is False  # tier 1 is never deferred
    assert shedder.spill(level) is spill
    assert shedder.stop_scheduling(level) is stop
    assert shedder.skip_enrichment(int(level)) is skip  # plain ints from a cursor work too


def test_configured_tier_lists_replace_the_defaults() -> None:
    shedder = LoadShedder(tier1=["bhp"], tier2=["RIO", "BHP"])
    assert shedder.tier("BHP") == 1  # a symbol in both lists belongs to the higher tier
    assert shedder.tier("RIO") == 2
    assert shedder.tier("BTCUSDT") == 3
    assert shedder.tiers() == {"tier1": ["BHP"], "tier2": ["RIO"]}


def test_tiers_from_config_falls_back_per_list() -> None:
    shedder = tiers_from_config(None, ["XYZ"])
    assert shedder.tier1 == frozenset(DEFAULT_TIER1)
    assert shedder.tier("XYZ") == 2 and shedder.tier("SOLUSDT") == 3


def test_tiers_from_recent_volume() -> None:
    volumes = {f"S{i:03d}": float(1000 - i) for i in range(150)}
    shedder = LoadShedder.from_volumes(volumes)
    assert shedder.tier("S000") == 1 and shedder.tier("S019") == 1
    assert shedder.tier("S020") == 2 and shedder.tier("S099") == 2
    assert shedder.tier("S100") == 3 and shedder.tier("S149") == 3
    assert shedder.tier("BTCUSDT") == 3  # not in the volumes: the defaults do not apply


def test_volume_ties_are_broken_by_symbol_so_tiers_are_stable() -> None:
    volumes = {"B": 5.0, "A": 5.0, "C": 1.0}
    assert LoadShedder.from_volumes(volumes, tier1_size=1, tier2_size=2).tiers() == {"tier1": ["A"], "tier2": ["B"]}
    assert LoadShedder.from_volumes(dict(reversed(volumes.items())), tier1_size=1, tier2_size=2).tiers() == {
        "tier1": ["A"],
        "tier2": ["B"],
    }


def test_bad_volumes_and_sizes_are_refused() -> None:
    with pytest.raises(K2Error, match=">= 0"):
        LoadShedder.from_volumes({"BTCUSDT": -1.0})
    with pytest.raises(K2Error, match="tier1_size"):
        LoadShedder.from_volumes({"BTCUSDT": 1.0}, tier1_size=0)


def test_split_keeps_tier1_and_tier2_and_defers_tier3_from_graceful() -> None:
    records = [{"symbol": s, "n": i} for i, s in enumerate(["BTCUSDT", "MWR", "SOLUSDT", "DVN", "BHP"])]
    shedder = LoadShedder()
    kept, deferred = shedder.split(records, L.GRACEFUL)
    assert [r["symbol"] for r in kept] == ["BTCUSDT", "SOLUSDT", "BHP"]
    assert [r["symbol"] for r in deferred] == ["MWR", "DVN"]
    assert shedder.split(records, L.SOFT) == (records, [])
    kept, deferred = shedder.split([("MWR", 1), ("BHP", 2)], L.AGGRESSIVE, symbol_of=lambda r: r[0])
    assert kept == [("BHP", 2)] and deferred == [("MWR", 1)]
