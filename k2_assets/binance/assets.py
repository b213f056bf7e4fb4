"""Binance trades from Kafka into ``market.trades``, one exact offset range per run."""

import json
from typing import Literal

from dagster import AssetExecutionContext, AssetMaterialization, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from k2_assets.binance.follow_report import FollowReport
from k2_assets.operations.health_checks import FollowerMaintenance
from k2_resources.catalog.errors import explaining_catalog_errors
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.follow import REPORT_SECONDS, FollowSettings, follow_topic
from k2_resources.sink.microbatch import BatchResult, recover_range, run_microbatch
from k2_resources.sink.offsets import OffsetRange

Mode = Literal["ingest", "recover", "follow"]
INGEST: Mode = "ingest"
RECOVER: Mode = "recover"
FOLLOW: Mode = "follow"


class MicroBatchConfig(Config):
    """The offset range [start_offset, end_offset) of one topic partition; set by the stream sensor.

    ``mode``: ``ingest`` appends the next range at ``degradation_level`` (0 NORMAL .. 3
    AGGRESSIVE: enrich, skip enrichment, defer tier-3 symbols, spill); ``recover`` writes the
    missing rows of the pending (deferred or spilled) range and removes it from the pending list;
    ``follow`` ignores the range and follows every partition of the topic, committing each one's new
    offsets every ``follow_interval_seconds`` for ``follow_seconds`` (k2_resources/sink/follow.py) and
    logging one materialisation of them per ``follow_report_seconds`` (follow_report.py).
    """

    topic: str = Field(default=BINANCE_TRADES_TOPIC)
    partition: int = Field(default=0, ge=0)
    start_offset: int = Field(default=0, ge=0)
    end_offset: int = Field(default=0, ge=0)
    degradation_level: int = Field(default=0, ge=0, le=4, description="0 NORMAL, 1 SOFT, 2 GRACEFUL, 3 AGGRESSIVE")
    mode: Mode = Field(default=INGEST)
    follow_seconds: float = Field(default=600.0, gt=0, description="follow: how long before handing back to the sensor")
    follow_interval_seconds: float = Field(default=1.0, ge=0, description="follow: how often to commit")
    follow_report_seconds: float = Field(
        default=REPORT_SECONDS, ge=0, description="follow: how often to log one materialisation of the commits"
    )
    max_batch_messages: int = Field(default=50_000, gt=0, description="follow: the largest range one commit takes")


@asset(
    group_name="binance",
    kinds={"kafka", "iceberg"},
    metadata={"table": "market.trades", "source": "Kafka topic market.trades.binance"},
)
def binance_trades(
    context: AssetExecutionContext,
    config: MicroBatchConfig,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    degradation: DegradationResource,
) -> MaterializeResult:
    """Binance spot trades (trade V2) in ``market.trades``, appended per Kafka offset range.

    Each run reads exactly its range and commits it in one Iceberg snapshot whose summary
    records the range; a range already committed writes nothing. The stream sensor
    `binance_stream_sensor` requests the runs; the ranges travel in run config and tags, not
    in partitions (a partition per micro-batch would outgrow Dagster's partition limits).
    Under load the sensor passes a degradation level: tier-3 symbols are then deferred, or raw
    batches spilled, and recorded as pending ranges that later ``recover`` runs write, exactly once.
    """
    batch = OffsetRange(config.topic, config.partition, config.start_offset, config.end_offset)
    level = DegradationLevel(config.degradation_level)
    shedder, spill_store = degradation.load_shedder(), degradation.spill_store()
    # A catalog or object store that is down fails the run with one error naming it and the fix.
    with explaining_catalog_errors(iceberg.catalog_properties):
        if config.mode == FOLLOW:
            return _follow(context, config, kafka, iceberg, degradation)
        if config.mode == RECOVER:
            result = recover_range(kafka, iceberg, batch, level=level, shedder=shedder, spill_store=spill_store)
            done = (
                "is not pending (already recovered)"
                if result.already_committed
                else f"recovered: {result.written} rows"
            )
            context.log.info(f"{batch.key} {done}")
        else:
            result = run_microbatch(kafka, iceberg, batch, level=level, shedder=shedder, spill_store=spill_store)
            if result.already_committed:
                context.log.info(f"{batch.key} is already in market.trades: nothing written")
    return MaterializeResult(metadata=batch_metadata(config.mode, level, batch, result))


def batch_metadata(mode: str, level: DegradationLevel, batch: OffsetRange, result: BatchResult) -> dict:
    """What a micro-batch materialisation records: its range, rows, gaps, dead letters and commit
    (the stream sensor reads the sequence gaps, `k2 metrics` the rows and commit seconds)."""
    return {
        "mode": mode,
        "degradation_level": level.name,
        "enriched": result.enriched,
        "deferred_rows": result.deferred,
        "deferred_rows_by_symbol": json.dumps(result.deferred_by_symbol, sort_keys=True),
        "spilled_rows": result.spilled,
        "sequence_gaps": sum(result.sequence_gaps.values()),
        "sequence_gaps_by_symbol": json.dumps(result.sequence_gaps, sort_keys=True),
        "topic": batch.topic,
        "partition": batch.partition,
        "start_offset": batch.start,
        "end_offset": batch.end,
        "rows_written": result.written,
        "dead_lettered": result.dead_lettered,
        "retention_lost_offsets": result.lost,
        "already_committed": result.already_committed,
        "snapshot_id": MetadataValue.text(str(result.snapshot_id)),
        "commit_seconds": round(result.commit_seconds, 3),
    }


def _follow(
    context: AssetExecutionContext,
    config: MicroBatchConfig,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    degradation: DegradationResource,
) -> MaterializeResult:
    """The topic's follower: its commits are logged as one materialisation per report window
    (follow_report.py: each partition's offset range, rows, gaps, snapshot ids); the run's own result
    closes the last window and sums up the run, so nothing committed goes unrecorded."""
    level = DegradationLevel(config.degradation_level)
    thresholds = degradation.thresholds()
    settings = FollowSettings(
        interval_s=config.follow_interval_seconds,
        run_for_s=config.follow_seconds,
        max_batch_messages=config.max_batch_messages,
        max_lag_messages=max(1, thresholds.lag_messages[0] // 2),
        memory_limit_percent=thresholds.memory_percent[0],
    )

    maintenance = FollowerMaintenance(context, iceberg)  # continuous table maintenance, on by default
    windows = FollowReport(
        config.topic,
        level.name,
        config.follow_report_seconds,
        lambda metadata: context.log_event(AssetMaterialization(asset_key=context.asset_key, metadata=metadata)),
        run_for_s=config.follow_seconds,
    )

    def report(result: BatchResult) -> None:
        maintenance.log_pending()
        windows.add(result)

    def pause(seconds: float) -> None:
        windows.due()  # each cycle, committed or not: a quiet stream's window still closes on time
        maintenance.pause(seconds)

    with maintenance:
        outcome = follow_topic(
            kafka,
            iceberg,
            config.topic,
            settings,
            report,
            level=level,
            shedder=degradation.load_shedder(),
            spill_store=degradation.spill_store(),
            pause=pause,
        )
    context.log.info(
        f"following {config.topic} ended ({outcome.reason}) after {outcome.commits} commits, "
        f"{outcome.rows_written} rows, reported in {windows.windows_emitted + 1} materialisation(s)"
    )
    # The last window's figures (rows_written, offset_ranges, ...; none when it committed nothing)
    # and the run's totals: `k2 metrics` sums rows_written over the windows, so each row counts once.
    return MaterializeResult(
        metadata={
            "mode": FOLLOW,
            "topic": config.topic,
            **windows.close(),
            "commits": outcome.commits,
            "rows_committed": outcome.rows_written,
            "ended_because": outcome.reason,
            "ranges": MetadataValue.text(", ".join(outcome.ranges[-50:])),
        }
    )
