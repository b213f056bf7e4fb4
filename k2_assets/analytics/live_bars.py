"""binance_live_bars: 1-minute bars of the last hours of Binance trades, including trades still in Kafka.

The one asset that reads through the hybrid resource: fresh bars without waiting for micro-batches
to commit. A schedule refreshes it every minute (stopped by default: start it in the UI under
Automation, or run `dagster schedule start binance_live_bars_every_minute`).
"""

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Config,
    DagsterRunStatus,
    DefaultScheduleStatus,
    MaterializeResult,
    MetadataValue,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    asset,
    define_asset_job,
    schedule,
)
from pydantic import Field

from k2_resources.analytics.live_bars import (
    bar_violations,
    compute_live_bars,
    live_bars_table,
    replace_live_bars,
    stored_live_bars,
    volume_mismatches,
)
from k2_resources.trades.hybrid import HybridQueryResource

GROUP = "analytics"
ASSET = "binance_live_bars"


class LiveBarsConfig(Config):
    """Which bars: the last ``hours`` of trades, of some symbols or all."""

    hours: float = Field(default=2.0, gt=0, le=48, description="window length, up to the newest trade's minute")
    symbols: list[str] = Field(default_factory=list, description="symbols to build bars for; empty: every symbol")
    allow_partial: bool = Field(
        default=False,
        description="when Kafka is down, build bars from Iceberg alone (the metadata names the missing offsets) "
        "instead of failing the run",
    )


CHECK_SPECS = [
    AssetCheckSpec(
        "volumes_match_hybrid_trades",
        asset=ASSET,
        description="per symbol, the stored bars' volume and trade count equal the hybrid trades "
        "(Iceberg plus Kafka tail) of the same window",
    ),
    AssetCheckSpec("high_at_least_open_and_close", asset=ASSET, description="every bar has high >= max(open, close)"),
    AssetCheckSpec("low_at_most_open_and_close", asset=ASSET, description="every bar has low <= min(open, close)"),
]


@asset(
    name=ASSET,
    deps=[AssetKey("binance_trades")],
    group_name=GROUP,
    check_specs=CHECK_SPECS,
    kinds={"iceberg", "kafka", "polars"},
    metadata={"table": "market.live_bars", "exchange": "BINANCE", "interval": "1m"},
)
def binance_live_bars(
    context: AssetExecutionContext, config: LiveBarsConfig, hybrid: HybridQueryResource
) -> MaterializeResult:
    """1-minute Binance bars of the last hours (default 2) up to the newest trade, Kafka tail included, in
    ``market.live_bars`` (replaced whole; a run with nothing new writes nothing). The metadata says how
    many trades came from Iceberg and how many from Kafka above the committed offsets."""
    live = compute_live_bars(
        hybrid,
        hours=config.hours,
        exchange="BINANCE",
        symbols=config.symbols or None,
        allow_partial=config.allow_partial,
    )
    stats = live.stats
    table = live_bars_table(hybrid.iceberg.catalog())
    window = f"[{live.start.isoformat()}, {live.end.isoformat()})" if live.start and live.end else "no trades"
    snapshot_id, written = replace_live_bars(
        table,
        live.bars,
        snapshot_properties={
            "k2.live-bars.window": window,
            "k2.live-bars.source-snapshot": str(stats.snapshot_id),
            "k2.live-bars.iceberg-rows": str(stats.iceberg_rows),
            "k2.live-bars.kafka-rows": str(stats.kafka_rows),
        },
    )
    stored = stored_live_bars(table)
    context.log.info(
        f"live bars {window}: {live.trades.height} trades ({stats.iceberg_rows} from Iceberg, "
        f"{stats.kafka_rows} from Kafka) -> {stored.height} bars; {'written' if written else 'unchanged'}"
    )
    if stats.partial:
        context.log.warning(f"Kafka was unreachable: the bars lack the trades of {'; '.join(stats.missing.values())}")
    kafka_ranges = {
        f"{topic}[{partition}]": [start, end] for (topic, partition), (start, end) in sorted(stats.kafka.ranges.items())
    }
    violations = bar_violations(stored)
    mismatches = volume_mismatches(stored, live.trades)
    return MaterializeResult(
        metadata={
            "window": window,
            "trades": live.trades.height,
            "bars": stored.height,
            "symbols": stored["symbol"].n_unique() if stored.height else 0,
            "iceberg_rows": stats.iceberg_rows,
            "kafka_rows": stats.kafka_rows,
            "duplicates_dropped": stats.duplicates_dropped,
            "committed_offsets": MetadataValue.json(
                {t: {str(p): o for p, o in c.items()} for t, c in stats.committed.items()}
            ),
            "kafka_offsets_read": MetadataValue.json(kafka_ranges),
            "kafka_skipped": MetadataValue.json(stats.kafka_skipped),
            "kafka_missing": MetadataValue.json(stats.missing),
            "source_snapshot_id": MetadataValue.text(str(stats.snapshot_id)),
            "live_bars_snapshot_id": MetadataValue.text(str(snapshot_id)),
            "written": written,
        },
        check_results=[
            AssetCheckResult(
                check_name="volumes_match_hybrid_trades",
                asset_key=ASSET,
                passed=not mismatches,
                severity=AssetCheckSeverity.ERROR,
                metadata={
                    "trades": live.trades.height,
                    "bars": stored.height,
                    "mismatches": MetadataValue.json(mismatches),
                    "partial": stats.partial,
                },
            ),
            AssetCheckResult(
                check_name="high_at_least_open_and_close",
                asset_key=ASSET,
                passed=violations["high_below_open_or_close"] == 0,
                metadata={"bars_breaking_rule": violations["high_below_open_or_close"]},
            ),
            AssetCheckResult(
                check_name="low_at_most_open_and_close",
                asset_key=ASSET,
                passed=violations["low_above_open_or_close"] == 0,
                metadata={"bars_breaking_rule": violations["low_above_open_or_close"]},
            ),
        ],
    )


binance_live_bars_refresh = define_asset_job(
    "binance_live_bars_refresh",
    selection=[ASSET],
    description="Rebuild the 1-minute live bars of the last hours from Iceberg and the Kafka tail.",
)

_ACTIVE = [DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.STARTED]


@schedule(
    job=binance_live_bars_refresh,
    cron_schedule="* * * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.STOPPED,
    description="Every minute, rebuild binance_live_bars (skipped while the previous refresh still runs).",
)
def binance_live_bars_every_minute(context: ScheduleEvaluationContext) -> RunRequest | SkipReason:
    active = context.instance.get_runs(
        filters=RunsFilter(job_name=binance_live_bars_refresh.name, statuses=_ACTIVE), limit=1
    )
    if active:
        return SkipReason(f"run {active[0].run_id} is still refreshing the live bars")
    return RunRequest(run_key=f"live-bars-{context.scheduled_execution_time.isoformat()}")


__all__ = ["binance_live_bars", "binance_live_bars_every_minute", "binance_live_bars_refresh", "LiveBarsConfig"]
