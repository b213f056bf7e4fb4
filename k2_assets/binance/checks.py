"""Checks on the Binance stream: consumer lag and the topic's offsets against the table's.

The stream sensor reports these every tick as AssetCheckEvaluations; defining them here
makes them visible (with history) in the UI and runnable on demand.
"""


from dagster import AssetCheckResult, AssetCheckSeverity, asset_check

from k2_assets.binance.assets import binance_trades
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.trades.sink import TradeSinkResource
from k2_sensors.binance.stream_state import StreamSnapshot, baseline_evaluation, lag_evaluation

CONSUMER_LAG = "consumer_lag"
OFFSET_BASELINE = "offset_baseline"


def _snapshot(kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource) -> StreamSnapshot:
    return StreamSnapshot.read(kafka, iceberg, sink.topic)


def _result(evaluation) -> AssetCheckResult:
    return AssetCheckResult(passed=evaluation.passed, severity=evaluation.severity, metadata=evaluation.metadata)


@asset_check(asset=binance_trades, name=CONSUMER_LAG, description="Messages in Kafka not yet in market.trades.")
def binance_consumer_lag(kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource) -> AssetCheckResult:
    return _result(lag_evaluation(_snapshot(kafka, iceberg, sink), sink))


@asset_check(
    asset=binance_trades,
    name=OFFSET_BASELINE,
    description="The topic's offsets are not below the table's committed offsets (topic or cluster recreated).",
)
def binance_offset_baseline(
    kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource
) -> AssetCheckResult:
    return _result(baseline_evaluation(_snapshot(kafka, iceberg, sink)))


__all__ = ["AssetCheckSeverity", "binance_consumer_lag", "binance_offset_baseline"]
