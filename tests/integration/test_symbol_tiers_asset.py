"""The symbol_tiers asset ranks real trades in a real Iceberg table, and load shedding follows it."""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from k2_assets.degradation.assets import symbol_tiers
from k2_resources.catalog.resource import IcebergResource, to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.degradation.resource import DegradationResource
from tests.support.recorded import recorded_trades
from tests.support.synthetic import asx_trades

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def _expected_order(rows: pl.DataFrame) -> list[str]:
    """Symbols by notional over each exchange's last 24 hours, computed independently of the library."""
    notional: dict[str, Decimal] = {}
    for exchange in rows["exchange"].unique():
        part = rows.filter(pl.col("exchange") == exchange)
        newest = part["timestamp"].max()
        for row in part.filter(pl.col("timestamp") > newest - timedelta(hours=24)).iter_rows(named=True):
            notional[row["symbol"]] = notional.get(row["symbol"], Decimal(0)) + row["price"] * row["quantity"]
    return sorted(notional, key=lambda s: (-notional[s], s))


def _materialize(iceberg: IcebergResource, degradation: DegradationResource, instance: DagsterInstance):
    result = materialize([symbol_tiers], instance=instance, resources={"iceberg": iceberg, "degradation": degradation})
    assert result.success
    [event] = result.get_asset_materialization_events()
    return event.materialization.metadata


def test_symbol_tiers_ranks_each_exchanges_last_24_hours_and_the_shedder_uses_it(k2_home) -> None:
    iceberg, degradation = IcebergResource(), DegradationResource()
    with DagsterInstance.ephemeral() as instance:
        metadata = _materialize(iceberg, degradation, instance)  # an empty table writes no ranking
        assert metadata["written"].value is False and not degradation.tiers_path().exists()
        assert degradation.tier_source()[1] == "lists"

        asx = asx_trades(scale=1)  # the five real ASX days, 10-14 March 2014
        binance = to_arrow(recorded_trades(4_000), TRADES)  # real BTCUSDT and ETHUSDT trades of 2024-08-09
        table = iceberg.trades()
        table.append(asx)
        table.append(binance)

        metadata = _materialize(iceberg, degradation, instance)
    rows = pl.concat([pl.from_arrow(asx), pl.from_arrow(binance)]).select(
        "symbol", "exchange", "timestamp", "price", "quantity"
    )
    expected = _expected_order(rows)
    stored = json.loads(degradation.tiers_path().read_text())
    assert [s["symbol"] for s in stored["symbols"]] == expected
    assert stored["source_snapshot_id"] == table.refresh().current_snapshot().snapshot_id
    # Each exchange's window is the 24 hours up to its own newest trade: ASX's is the last March 2014 day.
    asx_newest = rows.filter(pl.col("exchange") == "ASX")["timestamp"].max()
    assert stored["windows"]["ASX"][0] == (asx_newest - timedelta(hours=24)).isoformat()
    asx_traded = set(rows.filter(pl.col("exchange") == "ASX")["symbol"].unique().to_list())
    outside_window = asx_traded - set(expected)  # traded on earlier days only (MWR in the bundled data)
    assert outside_window and asx_traded & set(expected)
    assert metadata["written"].value is True and metadata["symbols"].value == len(expected)
    assert metadata["tier1_symbols"].value == len(expected)  # fewer than 20 symbols: all tier 1

    shedder, source = degradation.tier_source()
    assert source.startswith("ranking ")
    assert {symbol: shedder.tier(symbol) for symbol in expected} == {symbol: 1 for symbol in expected}
    assert all(shedder.tier(symbol) == 3 for symbol in outside_window)
    assert shedder.tier("BNBUSDT") == 3  # not traded in the window: tier 3 (the static lists put it in tier 2)
    assert DegradationResource(tiers_from_volume=False).load_shedder().tier("BNBUSDT") == 2
