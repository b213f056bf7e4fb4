"""Binance trades from Kafka into ``market.trades``, one exact offset range per run."""


import json
from typing import Literal

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from k2_resources.catalog_errors import explaining_catalog_errors
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.degradation.resource import DegradationResource
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.topics import BINANCE_TRADES_TOPIC
from k2_resources.trades.microbatch import recover_range, run_microbatch
from k2_resources.trades.offsets import OffsetRange

INGEST = "ingest"
RECOVER = "recover"


class MicroBatchConfig(Config):
    """The offset range [start_offset, end_offset) of one topic partition; set by the stream sensor.

    ``mode``: ``ingest`` appends the next range at ``degradation_level`` (0 NORMAL .. 3
    AGGRESSIVE: enrich, skip enrichment, defer tier-3 symbols, spill); ``recover`` writes the
    missing rows of the pending (deferred or spilled) range and removes it from the pending list.
    """

    topic: str = Field(default=BINANCE_TRADES_TOPIC)
    partition: int = Field(default=0, ge=0)
    start_offset: int = Field(default=0, ge=0)
    end_offset: int = Field(default=0, ge=0)
    degradation_level: int = Field(default=0, ge=0, le=4, description="0 NORMAL, 1 SOFT, 2 GRACEFUL, 3 AGGRESSIVE")
    mode: Literal["ingest", "recover"] = Field(default=INGEST)


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
        if config.mode == RECOVER:
            result = recover_range(kafka, iceberg, batch, level=level, shedder=shedder, spill_store=spill_store)
            done = "is not pending (already recovered)" if result.already_committed else f"recovered: {result.written} rows"
            context.log.info(f"{batch.key} {done}")
        else:
            result = run_microbatch(kafka, iceberg, batch, level=level, shedder=shedder, spill_store=spill_store)
            if result.already_committed:
                context.log.info(f"{batch.key} is already in market.trades: nothing written")
    return MaterializeResult(
        metadata={
            "mode": config.mode,
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
    )
