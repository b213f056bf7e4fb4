"""More than 100 symbols with known notionals: the symbol_tiers asset ranks them into all three tiers
in its ranking file, and a GRACEFUL micro-batch of the binance_trades asset then defers exactly the
ranking's tier 3, whatever the static lists say (BTCUSDT ranked last is deferred, BNBUSDT ranked
fifth is kept). Real Iceberg table, real broker, both assets materialised through Dagster."""

from __future__ import annotations

from decimal import Decimal

import pytest
from dagster import DagsterInstance, materialize

from k2_assets.binance.assets import binance_trades
from k2_assets.degradation.assets import symbol_tiers
from k2_resources.catalog.resource import IcebergResource, to_arrow
from k2_resources.catalog.tables import TRADES
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.degradation.resource import DegradationResource
from k2_resources.degradation.shedding import DEFAULT_TIER1, DEFAULT_TIER2
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import pending_ranges
from tests.support.sink_losses import produce_trades, trades_of

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# By falling notional: BNBUSDT fifth (a static tier-2 name), BTCUSDT last (a static tier-1 name).
OTHERS = [f"K{index:03d}USDT" for index in range(123)]
RANKED = [*OTHERS[:4], "BNBUSDT", *OTHERS[4:], "BTCUSDT"]
UNRANKED = "NEWUSDT"  # not traded in the window: tier 3


def _ranked_history() -> list[dict]:
    """Three trades per symbol, all at price 100; the quantity falls with the rank."""
    history = trades_of(RANKED * 3, first_index=10_000)
    for trade in history:
        trade["price"] = Decimal("100")
        trade["quantity"] = Decimal(len(RANKED) - RANKED.index(trade["symbol"]))
    return history


def test_more_than_twenty_symbols_are_shed_by_the_ranking_file(k2_home, kafka_broker, topic_name) -> None:
    assert len(RANKED) > 100 and "BTCUSDT" in DEFAULT_TIER1 and "BNBUSDT" in DEFAULT_TIER2
    kafka, iceberg, degradation = KafkaResource(), IcebergResource(), DegradationResource()
    iceberg.trades().append(to_arrow(_ranked_history(), TRADES))
    resources = {"iceberg": iceberg, "degradation": degradation, "kafka": kafka}
    with DagsterInstance.ephemeral() as instance:
        ranked = materialize([symbol_tiers], instance=instance, resources=resources)
        assert ranked.success
        metadata = ranked.get_asset_materialization_events()[0].materialization.metadata
        assert (metadata["tier1_symbols"].value, metadata["tier2_symbols"].value) == (20, 80)
        assert metadata["tier3_symbols"].value == len(RANKED) - 100
        _, source = degradation.tier_source()
        assert source.startswith(f"ranking {degradation.tiers_path()}")

        kafka.ensure_topic(topic_name, partitions=1)
        live = [*RANKED, UNRANKED]
        produce_trades(kafka, topic_name, live)
        config = {
            "topic": topic_name,
            "partition": 0,
            "start_offset": 0,
            "end_offset": len(live),
            "degradation_level": int(DegradationLevel.GRACEFUL),
        }
        run = materialize(
            [binance_trades],
            instance=instance,
            resources=resources,
            run_config={"ops": {"binance_trades": {"config": config}}},
        )
        assert run.success
        batch = run.get_asset_materialization_events()[0].materialization.metadata

    tier3 = {*RANKED[100:], UNRANKED}
    assert (batch["rows_written"].value, batch["deferred_rows"].value) == (100, len(tier3))
    [pending] = pending_ranges(iceberg.trades(), topic_name)
    assert set(pending.symbols) == tier3 and "BTCUSDT" in tier3 and "BNBUSDT" not in tier3
    rows = iceberg.trades().scan(selected_fields=("symbol", "source_sequence")).to_arrow().to_pylist()
    written_live = [row["symbol"] for row in rows if row["source_sequence"] < 10_000]
    assert sorted(written_live) == sorted(RANKED[:100])  # tiers 1 and 2 of the ranking, once each
