"""Checks on the Binance stream: consumer lag, the topic's offsets against the table's, the
degradation level, deferred and spilled backlogs, sequence gaps, dead letters and retention loss.

The stream sensor reports these every tick as AssetCheckEvaluations; defining them here
makes them visible (with history) in the UI and runnable on demand.
"""

from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, asset_check

from k2_assets.binance.assets import binance_trades
from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import system_memory_percent
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.observe import dead_letter_total, latest_batch_gaps, read_stream_offsets
from k2_sensors.binance.stream_checks import (
    DEAD_LETTER_COUNT,
    DEFERRED_BACKLOG,
    DEGRADATION_LEVEL,
    RETENTION_LOSS,
    SEQUENCE_GAPS,
    SPILLED_BACKLOG,
    baseline_evaluation,
    dead_letter_evaluation,
    deferred_backlog_evaluation,
    degradation_evaluation,
    lag_evaluation,
    retention_loss_evaluation,
    sequence_gap_evaluation,
    spilled_backlog_evaluation,
)
from k2_sensors.binance.stream_observation import StreamOffsets

CONSUMER_LAG = "consumer_lag"
OFFSET_BASELINE = "offset_baseline"


def _offsets(kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource) -> StreamOffsets:
    return read_stream_offsets(kafka, iceberg, sink.topic)


def _result(evaluation) -> AssetCheckResult:
    return AssetCheckResult(passed=evaluation.passed, severity=evaluation.severity, metadata=evaluation.metadata)


@asset_check(asset=binance_trades, name=CONSUMER_LAG, description="Messages in Kafka not yet in market.trades.")
def binance_consumer_lag(kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource) -> AssetCheckResult:
    return _result(lag_evaluation(_offsets(kafka, iceberg, sink), sink))


@asset_check(
    asset=binance_trades,
    name=OFFSET_BASELINE,
    description="The topic's offsets are not below the table's committed offsets (topic or cluster recreated).",
)
def binance_offset_baseline(
    kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource
) -> AssetCheckResult:
    return _result(baseline_evaluation(_offsets(kafka, iceberg, sink)))


@asset_check(
    asset=binance_trades,
    name=DEGRADATION_LEVEL,
    description="Degradation level of the stream path: WARN from GRACEFUL, ERROR at CIRCUIT_BREAK. The sensor "
    "reports it every tick with hysteresis and cooldown; run on demand it shows the level today's lag and "
    "memory trigger.",
)
def binance_degradation_level(
    kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource, degradation: DegradationResource
) -> AssetCheckResult:
    manager = degradation.manager(None)
    manager.evaluate(_offsets(kafka, iceberg, sink).total_lag, system_memory_percent())
    return _result(degradation_evaluation(manager))


@asset_check(
    asset=binance_trades,
    name=DEFERRED_BACKLOG,
    description="Offset ranges whose tier-3 rows were deferred by load shedding and are not in market.trades yet.",
)
def binance_deferred_backlog(
    kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource
) -> AssetCheckResult:
    return _result(deferred_backlog_evaluation(_offsets(kafka, iceberg, sink)))


@asset_check(
    asset=binance_trades,
    name=SPILLED_BACKLOG,
    description="Raw batches spilled to K2_HOME/spill at AGGRESSIVE and not yet written to market.trades.",
)
def binance_spilled_backlog(
    kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource, degradation: DegradationResource
) -> AssetCheckResult:
    return _result(spilled_backlog_evaluation(_offsets(kafka, iceberg, sink), degradation.spill_store().backlog()))


@asset_check(
    asset=binance_trades,
    name=SEQUENCE_GAPS,
    description="Binance trade ids missing inside the newest micro-batch of each partition (ids are contiguous per "
    "symbol), and the streamer's gap fill: gaps filled from the REST history and unfilled ones (losses: ERROR, with "
    "ids and counts, until accepted with `k2 offsets gaps --accept`).",
)
def binance_sequence_gaps(context: AssetCheckExecutionContext, sink: TradeSinkResource) -> AssetCheckResult:
    ledger = GapLedger.for_topic(sink.topic).summary().metadata()
    return _result(sequence_gap_evaluation(latest_batch_gaps(context.instance, sink.topic), ledger))


@asset_check(
    asset=binance_trades,
    name=DEAD_LETTER_COUNT,
    description="Messages in the dead-letter topic <topic>.dlq (undecodable records, with their reason).",
)
def binance_dead_letter_count(kafka: KafkaResource, sink: TradeSinkResource) -> AssetCheckResult:
    topic = dead_letter_topic(sink.topic)
    return _result(dead_letter_evaluation(topic, dead_letter_total(kafka, topic)))


@asset_check(
    asset=binance_trades,
    name=RETENTION_LOSS,
    description="Kafka retention deleted offsets market.trades had not committed: ERROR naming each partition, "
    "lost range and count, until an operator accepts the loss with `k2 offsets accept-loss`.",
)
def binance_retention_loss(kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource) -> AssetCheckResult:
    return _result(retention_loss_evaluation(_offsets(kafka, iceberg, sink)))


DEGRADATION_CHECKS = [
    binance_degradation_level,
    binance_deferred_backlog,
    binance_spilled_backlog,
    binance_sequence_gaps,
    binance_dead_letter_count,
]

__all__ = [
    "AssetCheckSeverity",
    "DEGRADATION_CHECKS",
    "binance_consumer_lag",
    "binance_offset_baseline",
    "binance_retention_loss",
]
