"""OHLCV bars in ``market.ohlcv``: ASX per trading day, Binance incrementally as micro-batches land."""

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from k2_assets.asx.partitions import asx_trading_days
from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.analytics.incremental import update_binance_bars
from k2_resources.analytics.ohlcv import (
    INTERVALS,
    bar_violations,
    exchange_day_bounds,
    ohlcv_table,
    read_trades,
    replace_bars,
    stored_bars,
)
from k2_resources.catalog.resource import IcebergResource
from k2_resources.trades.iceberg_read import RowFilter

GROUP = "analytics"

# The ASX domain's own trading-day partitions, so that asx_ohlcv maps 1:1 onto asx_trades.
ASX_DAYS = asx_trading_days


def _check_specs(asset_name: str) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec(
            "high_at_least_open_and_close", asset=asset_name, description="every bar has high >= max(open, close)"
        ),
        AssetCheckSpec(
            "low_at_most_open_and_close", asset=asset_name, description="every bar has low <= min(open, close)"
        ),
        AssetCheckSpec(
            "volumes_add_up_to_trades",
            asset=asset_name,
            description="in every interval, the bars' volumes and counts add up to the trades table",
        ),
    ]


def _checks(asset_name: str, stored: pl.DataFrame, trades: pl.DataFrame) -> list[AssetCheckResult]:
    """The three checks over the bars as stored, against the trades they came from."""
    violations = bar_violations(stored)
    trade_volume = trades["quantity"].sum() if trades.height else 0
    per_interval = {
        row["interval"]: row
        for row in stored.group_by("interval")
        .agg(pl.col("volume").sum(), pl.col("trade_count").sum())
        .iter_rows(named=True)
    }
    mismatches = {
        interval: f"volume {per_interval.get(interval, {}).get('volume', 0)} in "
        f"{per_interval.get(interval, {}).get('trade_count', 0)} trades"
        for interval in INTERVALS
        if trades.height
        and (
            interval not in per_interval
            or per_interval[interval]["volume"] != trade_volume
            or per_interval[interval]["trade_count"] != trades.height
        )
    }
    return [
        AssetCheckResult(
            check_name="high_at_least_open_and_close",
            asset_key=asset_name,
            passed=violations["high_below_open_or_close"] == 0,
            metadata={"bars_breaking_rule": violations["high_below_open_or_close"], "bars": stored.height},
        ),
        AssetCheckResult(
            check_name="low_at_most_open_and_close",
            asset_key=asset_name,
            passed=violations["low_above_open_or_close"] == 0,
            metadata={"bars_breaking_rule": violations["low_above_open_or_close"], "bars": stored.height},
        ),
        AssetCheckResult(
            check_name="volumes_add_up_to_trades",
            asset_key=asset_name,
            passed=not mismatches,
            severity=AssetCheckSeverity.ERROR,
            metadata={
                "trades": trades.height,
                "trade_volume": str(trade_volume),
                "mismatches": MetadataValue.json(mismatches),
            },
        ),
    ]


@asset(
    partitions_def=ASX_DAYS,
    deps=[AssetKey("asx_trades")],
    group_name=GROUP,
    check_specs=_check_specs("asx_ohlcv"),
    kinds={"iceberg", "polars"},
    metadata={"table": "market.ohlcv", "exchange": "ASX"},
)
def asx_ohlcv(
    context: AssetExecutionContext, iceberg: IcebergResource, analytics: AnalyticsEngineResource
) -> MaterializeResult:
    """ASX OHLCV bars (1m, 5m, 1h and the Sydney trading day; VWAP and trade counts) of one trading day
    in ``market.ohlcv``. Re-materialising a day replaces that day's bars in one commit. The bars are
    computed by the ``analytics`` engine (K2_ANALYTICS_ENGINE: polars in process, or spark)."""
    day = context.partition_key
    start, end = exchange_day_bounds("ASX", day)
    table = iceberg.trades()
    snapshot = table.current_snapshot()
    snapshot_id = snapshot.snapshot_id if snapshot else None
    row_filter = RowFilter(None, start, end, "ASX")
    trades = read_trades(table, snapshot_id, row_filter)  # for the checks, and the in-process engine
    bars = analytics.ohlcv_bars(iceberg, table, snapshot_id, row_filter, trades=trades)
    ohlcv = ohlcv_table(iceberg.catalog())
    written = replace_bars(
        ohlcv,
        bars,
        "ASX",
        start,
        end,
        snapshot_properties={"k2.ohlcv.source-snapshot": str(snapshot_id), "k2.ohlcv.asx-day": day},
    )
    stored = stored_bars(ohlcv, "ASX", start, end)
    context.log.info(f"ASX {day}: {trades.height} trades -> {bars.height} bars ({analytics.name})")
    return MaterializeResult(
        metadata={
            "engine": analytics.name,
            "trades": trades.height,
            "bars": bars.height,
            "bars_per_interval": MetadataValue.json(
                {r["interval"]: r["len"] for r in bars.group_by("interval").len().iter_rows(named=True)}
            ),
            "source_snapshot_id": MetadataValue.text(str(snapshot_id)),
            "ohlcv_snapshot_id": MetadataValue.text(str(written)),
            "utc_range": f"[{start.isoformat()}, {end.isoformat()})",
        },
        check_results=_checks("asx_ohlcv", stored, trades),
    )


def _last_source_snapshot(context: AssetExecutionContext) -> int | None:
    event = context.instance.get_latest_materialization_event(context.asset_key)
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get("source_snapshot_id")
    text = getattr(value, "value", None) if value is not None else None
    return int(text) if text and text != "None" else None


@asset(
    deps=[AssetKey("binance_trades")],
    group_name=GROUP,
    check_specs=_check_specs("binance_ohlcv"),
    kinds={"iceberg", "polars"},
    automation_condition=AutomationCondition.eager(),
    metadata={"table": "market.ohlcv", "exchange": "BINANCE"},
)
def binance_ohlcv(
    context: AssetExecutionContext, iceberg: IcebergResource, analytics: AnalyticsEngineResource
) -> MaterializeResult:
    """Binance OHLCV bars (1m, 5m, 1h, 1d UTC; VWAP and trade counts) in ``market.ohlcv``, kept up to date
    as micro-batches land.

    Each run reads what was appended to market.trades since the snapshot its last run saw (kept in
    the materialization metadata), recomputes the 1m bars of the touched minutes from the trades,
    rolls the 5m, 1h and 1d bars of the touched days up from the day's 1m bars, and replaces those
    days' bars in one commit: whole buckets, so the bars stay exact however batches are cut.
    The 1m bars are computed by the ``analytics`` engine (K2_ANALYTICS_ENGINE: polars, or spark).
    """
    report = update_binance_bars(iceberg, _last_source_snapshot(context), engine=analytics)
    checks = _checks("binance_ohlcv", report.stored, report.trades)
    if report.nothing_new:
        return MaterializeResult(
            metadata={
                "source_snapshot_id": MetadataValue.text(str(report.source_snapshot_id)),
                "days": 0,
                "note": "no new trades",
            },
            check_results=checks,
        )
    context.log.info(f"Binance bars: {len(report.days)} day(s) recomputed ({report.how})")
    return MaterializeResult(
        metadata={
            "source_snapshot_id": MetadataValue.text(str(report.source_snapshot_id)),
            "previous_source_snapshot_id": MetadataValue.text(str(report.previous_snapshot_id)),
            "days": len(report.days),
            "days_recomputed": ", ".join(d.date().isoformat() for d in report.days),
            "engine": analytics.name,
            "bars_written": report.bars_written,
            "how": report.how,
        },
        check_results=checks,
    )


__all__ = ["asx_ohlcv", "binance_ohlcv", "ASX_DAYS"]
