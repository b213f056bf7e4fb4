"""OHLCV bars in ``market.ohlcv``: ASX per trading day, Binance incrementally as micro-batches land."""


from datetime import datetime, timedelta

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
from pyiceberg.expressions import And, EqualTo, GreaterThanOrEqual, LessThan
from pyiceberg.table import Table

from k2_assets.asx.partitions import asx_trading_days
from k2_resources.analytics.ohlcv import (
    INTERVALS,
    TRADE_COLUMNS,
    bar_violations,
    exchange_day_bounds,
    ohlcv_bars,
    ohlcv_table,
    replace_bars,
    roll_up,
)
from k2_resources.iceberg import IcebergResource
from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader

GROUP = "analytics"

# The ASX domain's own trading-day partitions, so that asx_ohlcv maps 1:1 onto asx_trades.
ASX_DAYS = asx_trading_days


def _check_specs(asset_name: str) -> list[AssetCheckSpec]:
    return [
        AssetCheckSpec("high_at_least_open_and_close", asset=asset_name,
                       description="every bar has high >= max(open, close)"),
        AssetCheckSpec("low_at_most_open_and_close", asset=asset_name,
                       description="every bar has low <= min(open, close)"),
        AssetCheckSpec("volumes_add_up_to_trades", asset=asset_name,
                       description="in every interval, the bars' volumes and counts add up to the trades table"),
    ]


def _stored_bars(ohlcv: Table, exchange: str, start: datetime, end: datetime) -> pl.DataFrame:
    rows = ohlcv.scan(row_filter=And(EqualTo("exchange", exchange), And(
        GreaterThanOrEqual("bucket_start", start.isoformat()), LessThan("bucket_start", end.isoformat())))).to_arrow()
    return pl.from_arrow(rows)


def _checks(asset_name: str, stored: pl.DataFrame, trades: pl.DataFrame) -> list[AssetCheckResult]:
    """The three checks over the bars as stored, against the trades they came from."""
    violations = bar_violations(stored)
    trade_volume = trades["quantity"].sum() if trades.height else 0
    per_interval = {
        row["interval"]: row for row in stored.group_by("interval").agg(
            pl.col("volume").sum(), pl.col("trade_count").sum()).iter_rows(named=True)
    }
    mismatches = {
        interval: f"volume {per_interval.get(interval, {}).get('volume', 0)} in "
                  f"{per_interval.get(interval, {}).get('trade_count', 0)} trades"
        for interval in INTERVALS
        if trades.height and (interval not in per_interval or per_interval[interval]["volume"] != trade_volume
                              or per_interval[interval]["trade_count"] != trades.height)
    }
    return [
        AssetCheckResult(check_name="high_at_least_open_and_close", asset_key=asset_name,
                         passed=violations["high_below_open_or_close"] == 0,
                         metadata={"bars_breaking_rule": violations["high_below_open_or_close"], "bars": stored.height}),
        AssetCheckResult(check_name="low_at_most_open_and_close", asset_key=asset_name,
                         passed=violations["low_above_open_or_close"] == 0,
                         metadata={"bars_breaking_rule": violations["low_above_open_or_close"], "bars": stored.height}),
        AssetCheckResult(check_name="volumes_add_up_to_trades", asset_key=asset_name, passed=not mismatches,
                         severity=AssetCheckSeverity.ERROR,
                         metadata={"trades": trades.height, "trade_volume": str(trade_volume),
                                   "mismatches": MetadataValue.json(mismatches)}),
    ]


def _read_trades(table: Table, snapshot_id: int | None, row_filter: RowFilter) -> pl.DataFrame:
    reader = SnapshotReader()
    try:
        return pl.from_arrow(reader.read(table, snapshot_id, row_filter, columns=TRADE_COLUMNS))
    finally:
        reader.close()


@asset(
    partitions_def=ASX_DAYS,
    deps=[AssetKey("asx_trades")],
    group_name=GROUP,
    check_specs=_check_specs("asx_ohlcv"),
    kinds={"iceberg", "polars"},
    metadata={"table": "market.ohlcv", "exchange": "ASX"},
)
def asx_ohlcv(context: AssetExecutionContext, iceberg: IcebergResource) -> MaterializeResult:
    """ASX OHLCV bars (1m, 5m, 1h and the Sydney trading day; VWAP and trade counts) of one trading day
    in ``market.ohlcv``. Re-materialising a day replaces that day's bars in one commit."""
    day = context.partition_key
    start, end = exchange_day_bounds("ASX", day)
    table = iceberg.trades()
    snapshot = table.current_snapshot()
    snapshot_id = snapshot.snapshot_id if snapshot else None
    trades = _read_trades(table, snapshot_id, RowFilter(None, start, end, "ASX"))
    bars = ohlcv_bars(trades)
    ohlcv = ohlcv_table(iceberg.catalog())
    written = replace_bars(ohlcv, bars, "ASX", start, end, snapshot_properties={
        "k2.ohlcv.source-snapshot": str(snapshot_id), "k2.ohlcv.asx-day": day})
    stored = _stored_bars(ohlcv, "ASX", start, end)
    context.log.info(f"ASX {day}: {trades.height} trades -> {bars.height} bars")
    return MaterializeResult(
        metadata={
            "trades": trades.height,
            "bars": bars.height,
            "bars_per_interval": MetadataValue.json(
                {r["interval"]: r["len"] for r in bars.group_by("interval").len().iter_rows(named=True)}),
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


def _touched_days(table: Table, last: int | None, current: int) -> tuple[list[datetime], str]:
    """UTC day starts whose Binance trades changed since snapshot ``last``, and how that was found."""
    binance = EqualTo("exchange", "BINANCE")
    if last is not None and table.snapshot_by_id(last) is not None:
        appended = table.incremental_append_scan(from_snapshot_id_exclusive=last, to_snapshot_id_inclusive=current,
                                                 row_filter=binance, selected_fields=("timestamp",)).to_arrow()
        how = f"appended since snapshot {last}"
    else:
        appended = table.scan(row_filter=binance, selected_fields=("timestamp",), snapshot_id=current).to_arrow()
        how = "full recompute (no earlier run, or its snapshot expired)"
    if appended.num_rows == 0:
        return [], how
    days = pl.from_arrow(appended).select(pl.col("timestamp").dt.truncate("1d").unique().sort())["timestamp"]
    return days.to_list(), how


@asset(
    deps=[AssetKey("binance_trades")],
    group_name=GROUP,
    check_specs=_check_specs("binance_ohlcv"),
    kinds={"iceberg", "polars"},
    automation_condition=AutomationCondition.eager(),
    metadata={"table": "market.ohlcv", "exchange": "BINANCE"},
)
def binance_ohlcv(context: AssetExecutionContext, iceberg: IcebergResource) -> MaterializeResult:
    """Binance OHLCV bars (1m, 5m, 1h, 1d UTC; VWAP and trade counts) in ``market.ohlcv``, kept up to date
    as micro-batches land.

    Each run reads what was appended to market.trades since the snapshot its last run saw (kept in
    the materialization metadata), recomputes the 1m bars of the touched minutes from the trades,
    rolls the 5m, 1h and 1d bars of the touched days up from the day's 1m bars, and replaces those
    days' bars in one commit: whole buckets, so the bars stay exact however batches are cut.
    """
    table = iceberg.trades()
    snapshot = table.current_snapshot()
    last = _last_source_snapshot(context)
    if snapshot is None or snapshot.snapshot_id == last:
        return MaterializeResult(metadata={"source_snapshot_id": MetadataValue.text(str(last)), "days": 0,
                                           "note": "no new trades"},
                                 check_results=_checks("binance_ohlcv", _empty_bars(), _empty_trades()))
    current = snapshot.snapshot_id
    days, how = _touched_days(table, last, current)
    ohlcv = ohlcv_table(iceberg.catalog())
    all_stored, all_trades, bars_written = [], [], 0
    for day_start in days:
        day_end = day_start + timedelta(days=1)
        appended = table.incremental_append_scan(
            from_snapshot_id_exclusive=last, to_snapshot_id_inclusive=current,
            row_filter=And(EqualTo("exchange", "BINANCE"), And(
                GreaterThanOrEqual("timestamp", day_start.isoformat()), LessThan("timestamp", day_end.isoformat()))),
            selected_fields=("timestamp",)).to_arrow() if last is not None and table.snapshot_by_id(last) else None
        if appended is not None and appended.num_rows:
            stamps = pl.from_arrow(appended)["timestamp"]
            first_minute = stamps.min().replace(second=0, microsecond=0)
            end_minute = stamps.max().replace(second=0, microsecond=0) + timedelta(minutes=1)
        else:
            first_minute, end_minute = day_start, day_end
        trades = _read_trades(table, current, RowFilter(None, first_minute, end_minute, "BINANCE"))
        fresh = ohlcv_bars(trades, intervals=["1m"])
        kept = _stored_bars(ohlcv, "BINANCE", day_start, day_end).filter(
            (pl.col("interval") == "1m") & ((pl.col("bucket_start") < first_minute) | (pl.col("bucket_start") >= end_minute)))
        minutes = pl.concat([kept, fresh]).sort("symbol", "bucket_start")
        bars = pl.concat([minutes] + [roll_up(minutes, interval) for interval in INTERVALS if interval != "1m"])
        replace_bars(ohlcv, bars, "BINANCE", day_start, day_end, snapshot_properties={
            "k2.ohlcv.source-snapshot": str(current), "k2.ohlcv.binance-day": day_start.date().isoformat()})
        bars_written += bars.height
        all_stored.append(_stored_bars(ohlcv, "BINANCE", day_start, day_end))
        all_trades.append(_read_trades(table, current, RowFilter(None, day_start, day_end, "BINANCE")))
    context.log.info(f"Binance bars: {len(days)} day(s) recomputed ({how})")
    stored = pl.concat(all_stored) if all_stored else _empty_bars()
    trades = pl.concat(all_trades) if all_trades else _empty_trades()
    return MaterializeResult(
        metadata={
            "source_snapshot_id": MetadataValue.text(str(current)),
            "previous_source_snapshot_id": MetadataValue.text(str(last)),
            "days": len(days),
            "days_recomputed": ", ".join(d.date().isoformat() for d in days),
            "bars_written": bars_written,
            "how": how,
        },
        check_results=_checks("binance_ohlcv", stored, trades),
    )


def _empty_bars() -> pl.DataFrame:
    from k2_resources.analytics.ohlcv import OHLCV

    return pl.from_arrow(OHLCV.arrow_schema().empty_table())


def _empty_trades() -> pl.DataFrame:
    from k2_resources.tables import TRADES

    return pl.from_arrow(TRADES.arrow_schema().empty_table()).select(TRADE_COLUMNS)


__all__ = ["asx_ohlcv", "binance_ohlcv", "ASX_DAYS"]
