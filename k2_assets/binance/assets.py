"""Binance trades from Kafka into ``market.trades``, one exact offset range per run."""


from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.trades.microbatch import DEFAULT_TOPIC, run_microbatch
from k2_resources.trades.offsets import OffsetRange


class MicroBatchConfig(Config):
    """The offset range [start_offset, end_offset) of one topic partition; set by the stream sensor."""

    topic: str = Field(default=DEFAULT_TOPIC)
    partition: int = Field(default=0, ge=0)
    start_offset: int = Field(default=0, ge=0)
    end_offset: int = Field(default=0, ge=0)


@asset(
    group_name="binance",
    kinds={"kafka", "iceberg"},
    metadata={"table": "market.trades", "source": "Kafka topic market.trades.binance"},
)
def binance_trades(
    context: AssetExecutionContext, config: MicroBatchConfig, kafka: KafkaResource, iceberg: IcebergResource
) -> MaterializeResult:
    """Binance spot trades (trade V2) in ``market.trades``, appended per Kafka offset range.

    Each run reads exactly its range and commits it in one Iceberg snapshot whose summary
    records the range; a range already committed writes nothing. The stream sensor
    `binance_stream_sensor` requests the runs; the ranges travel in run config and tags, not
    in partitions (a partition per micro-batch would outgrow Dagster's partition limits).
    """
    batch = OffsetRange(config.topic, config.partition, config.start_offset, config.end_offset)
    result = run_microbatch(kafka, iceberg, batch)
    if result.already_committed:
        context.log.info(f"{batch.key} is already in market.trades: nothing written")
    return MaterializeResult(
        metadata={
            "topic": batch.topic,
            "partition": batch.partition,
            "start_offset": batch.start,
            "end_offset": batch.end,
            "rows_written": result.written,
            "dead_lettered": result.dead_lettered,
            "already_committed": result.already_committed,
            "snapshot_id": MetadataValue.text(str(result.snapshot_id)),
            "commit_seconds": round(result.commit_seconds, 3),
        }
    )
