"""Tiers from volumes: the ranking's boundaries and ties, its file, and the resource's choice of tiers."""

from __future__ import annotations

import os
import random
from datetime import UTC, datetime
from decimal import Decimal

import polars as pl
import pytest

from k2_resources.degradation.resource import DegradationResource
from k2_resources.degradation.shedding import DEFAULT_TIER1
from k2_resources.degradation.tiers import (
    SymbolRanking,
    newest_ranking,
    rank_symbols,
    read_ranking,
    write_ranking,
)
from k2_resources.errors import K2Error

DECIMAL = pl.Decimal(18, 8)


def _recorded_volumes() -> list[tuple[str, str, str]]:
    """(symbol, price, quantity) trades of 130 symbols whose notionals are known exactly.

    Rank r (1-based) has notional 10_000 - r * 10, except two designed ties right at the tier
    boundaries: rank 20/21 (TIE20A, TIE20Z: 0.1 x 3 per trade vs 0.3 x 1, equal only in exact
    decimals) and rank 100/101 (TIE100A, TIE100Z, made of different numbers of trades).
    """
    trades: list[tuple[str, str, str]] = []
    for rank in range(1, 131):
        if rank in (20, 21, 100, 101):
            continue
        notional = Decimal(10_000 - rank * 10)
        symbol = f"S{rank:03d}"
        trades += [(symbol, str(notional / 4), "1"), (symbol, str(notional / 2), "1.5")]  # 1/4 + 3/4 of it
    trades += [("TIE20Z", "0.3", "32666")]  # 9799.8, between rank 19 (9810) and rank 22 (9780)
    trades += [("TIE20A", "0.1", "32666")] * 3  # 3 x 3266.6 = 9799.8 exactly (not in floating point)
    boundary100 = Decimal(10_000 - 100 * 10)
    trades += [("TIE100Z", str(boundary100), "1")]
    trades += [("TIE100A", str(boundary100 / 8), "1")] * 8
    return trades


def _frame(trades: list[tuple[str, str, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "symbol": [t[0] for t in trades],
            "exchange": ["BINANCE"] * len(trades),
            "price": [Decimal(t[1]) for t in trades],
            "quantity": [Decimal(t[2]) for t in trades],
        },
        schema={"symbol": pl.String, "exchange": pl.String, "price": DECIMAL, "quantity": DECIMAL},
    )


def test_ranking_boundaries_20_21_and_100_101_with_ties_broken_by_name() -> None:
    trades = _recorded_volumes()
    ranked = rank_symbols(_frame(trades))
    by_rank = {r.rank: r for r in ranked}
    assert len(ranked) == 130
    assert [r.rank for r in ranked] == list(range(1, 131))
    # The 20th and 21st carry the same notional; the name decides, and the 20th is the last of tier 1.
    assert by_rank[20].notional == by_rank[21].notional == Decimal("9799.8")
    assert 0.1 * 32666 * 3 != 0.3 * 32666  # the tie only holds in exact decimals
    assert (by_rank[19].symbol, by_rank[20].symbol, by_rank[21].symbol, by_rank[22].symbol) == (
        "S019",
        "TIE20A",
        "TIE20Z",
        "S022",
    )
    assert (by_rank[20].tier, by_rank[21].tier) == (1, 2)
    assert (by_rank[100].symbol, by_rank[101].symbol) == ("TIE100A", "TIE100Z")
    assert (by_rank[100].tier, by_rank[101].tier) == (2, 3)
    assert by_rank[100].trades == 8 and by_rank[101].trades == 1
    assert sum(r.tier == 1 for r in ranked) == 20 and sum(r.tier == 2 for r in ranked) == 80
    # The notionals are the exact sums of price x quantity.
    expected: dict[str, Decimal] = {}
    for symbol, price, quantity in trades:
        expected[symbol] = expected.get(symbol, Decimal(0)) + Decimal(price) * Decimal(quantity)
    assert {r.symbol: r.notional for r in ranked} == pytest.approx(expected, rel=Decimal("1e-12"))
    # The input order does not matter.
    shuffled = trades[:]
    random.Random(7).shuffle(shuffled)
    assert rank_symbols(_frame(shuffled)) == ranked


def test_an_empty_frame_ranks_nothing_and_bad_input_is_named() -> None:
    assert rank_symbols(_frame([])) == []
    with pytest.raises(K2Error, match="tier sizes"):
        rank_symbols(_frame([]), tier1_size=5, tier2_size=4)
    with pytest.raises(K2Error, match=r"\['exchange'\]"):
        rank_symbols(_frame([("A", "1", "1")]).drop("exchange"))


def _ranking(trades: list[tuple[str, str, str]]) -> SymbolRanking:
    return SymbolRanking(
        tuple(rank_symbols(_frame(trades))),
        datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
        {"BINANCE": (datetime(2026, 1, 1, 3, 4, tzinfo=UTC), datetime(2026, 1, 2, 3, 4, tzinfo=UTC))},
        42,
    )


def test_the_ranking_file_round_trips_and_is_written_atomically(tmp_path) -> None:
    ranking = _ranking(_recorded_volumes())
    path = write_ranking(ranking, tmp_path / "tiers" / "symbol_tiers.json")
    assert read_ranking(path) == ranking
    assert [p.name for p in path.parent.iterdir()] == ["symbol_tiers.json"]  # no temporary left behind
    assert read_ranking(tmp_path / "absent.json") is None
    path.write_text("{not json")
    with pytest.raises(K2Error, match="delete it and materialise the symbol_tiers asset"):
        read_ranking(path)


def test_the_resource_uses_the_newest_ranking_and_falls_back_to_the_lists_only_without_one(k2_home) -> None:
    resource = DegradationResource()
    shedder, source = resource.tier_source()
    assert source == "lists" and shedder.tier("BTCUSDT") == 1 and shedder.tier("BNBUSDT") == 2  # no ranking yet
    assert set(DEFAULT_TIER1) == shedder.tier1

    write_ranking(_ranking(_recorded_volumes()), resource.tiers_path())
    assert resource.tiers_path() == k2_home / "degradation" / "symbol_tiers.json"
    shedder, source = resource.tier_source()
    assert source.startswith("ranking ")
    assert shedder.tier("S001") == 1 and shedder.tier("TIE20A") == 1 and shedder.tier("TIE20Z") == 2
    assert shedder.tier("TIE100A") == 2 and shedder.tier("TIE100Z") == 3
    assert shedder.tier("BTCUSDT") == 3 and shedder.tier("BHP") == 3  # not ranked: tier 3, the lists are not mixed in
    assert resource.load_shedder() is resource.load_shedder()  # parsed once while the file is unchanged

    # A new ranking replaces the file (a new inode), and the next call sees it.
    write_ranking(_ranking([("BTCUSDT", "60000", "2"), ("ETHUSDT", "3000", "1")]), resource.tiers_path())
    shedder = resource.load_shedder()
    assert shedder.tier("BTCUSDT") == 1 and shedder.tier("S001") == 3

    # Lists pinned by configuration ignore the ranking; an empty ranking counts as none.
    pinned = DegradationResource(tiers_from_volume=False, tier1_symbols=["S130"])
    assert pinned.tier_source()[1] == "lists" and pinned.load_shedder().tier("S130") == 1
    write_ranking(_ranking([]), resource.tiers_path())
    assert resource.tier_source()[1] == "lists"
    os.remove(resource.tiers_path())
    assert newest_ranking(resource.tiers_path()) is None and resource.tier_source()[1] == "lists"
