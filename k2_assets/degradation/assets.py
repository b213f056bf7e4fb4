"""The volume ranking of symbols that load shedding reads its tiers from."""

from dagster import AssetExecutionContext, AssetKey, MaterializeResult, MetadataValue, asset

from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.resource import DegradationResource
from k2_resources.degradation.tiers import RANKING_WINDOW, SymbolRanking, ranking_from_trades, write_ranking
from k2_resources.trades.recent import recent_trades

GROUP = "operations"


def _tier_table(ranking: SymbolRanking, limit: int) -> str:
    """The first ``limit`` ranked symbols as a Markdown table (for the UI)."""
    lines = ["| rank | symbol | exchange | tier | notional | trades |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {s.rank} | {s.symbol} | {s.exchange} | {s.tier} | {s.notional:,.2f} | {s.trades} |"
        for s in ranking.symbols[:limit]
    ]
    return "\n".join(lines)


@asset(
    group_name=GROUP,
    deps=[AssetKey("asx_trades"), AssetKey("binance_trades")],
    kinds={"iceberg", "polars"},
    metadata={"source": "market.trades", "window_hours": RANKING_WINDOW.total_seconds() / 3600},
)
def symbol_tiers(
    context: AssetExecutionContext, iceberg: IcebergResource, degradation: DegradationResource
) -> MaterializeResult:
    """Symbols ranked by traded notional (price x quantity) over each exchange's last 24 hours of
    trades in ``market.trades``: tier 1 the top 20, tier 2 the top 100, the rest tier 3.

    The ranking is written atomically to ``K2_HOME/degradation/symbol_tiers.json`` (the
    ``degradation`` resource's ``tiers_file``), where every micro-batch's load shedder reads it;
    the static tier lists apply only while no ranking exists. An empty table writes nothing.
    """
    recent = recent_trades(iceberg.trades(), RANKING_WINDOW)
    ranking = ranking_from_trades(recent.trades, recent.windows, recent.snapshot_id)
    windows = {exchange: [start.isoformat(), end.isoformat()] for exchange, (start, end) in ranking.windows.items()}
    if not ranking.symbols:
        context.log.info("market.trades holds no trades: no ranking written, the previous one (or the lists) stays")
        return MaterializeResult(metadata={"written": False, "symbols": 0})
    path = write_ranking(ranking, degradation.tiers_path())
    tier1, tier2 = ranking.tier_symbols(1), ranking.tier_symbols(2)
    context.log.info(f"{len(ranking.symbols)} symbols ranked: {len(tier1)} tier 1, {len(tier2)} tier 2 -> {path}")
    return MaterializeResult(
        metadata={
            "written": True,
            "path": MetadataValue.path(str(path)),
            "symbols": len(ranking.symbols),
            "tier1_symbols": len(tier1),
            "tier2_symbols": len(tier2),
            "tier3_symbols": len(ranking.symbols) - len(tier1) - len(tier2),
            "windows": MetadataValue.json(windows),
            "source_snapshot_id": MetadataValue.text(str(ranking.source_snapshot_id)),
            "ranking": MetadataValue.md(_tier_table(ranking, 30)),
        }
    )
