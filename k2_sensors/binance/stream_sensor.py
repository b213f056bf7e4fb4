"""The stream sensor: watches the Binance topic and the table, requests micro-batch runs,
and reports lag and offset-baseline checks every tick.

A tick only reads offsets (Kafka end offsets, the table's committed offsets) and the status
of the runs it requested: it stays far below the sensor timeout; the work is in the runs.
"""


import os

from dagster import (
    AssetCheckEvaluation,
    AssetKey,
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.storage.tags import RUN_KEY_TAG

from k2_assets.binance.jobs import binance_trades_job
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.trades.offsets import OffsetRange
from k2_resources.trades.sink import TradeSinkResource
from k2_sensors.binance.stream_state import (
    RUN_ACTIVE,
    RUN_FAILED,
    RUN_SUCCEEDED,
    CheckOutcome,
    StreamCursor,
    StreamSnapshot,
    baseline_evaluation,
    lag_evaluation,
    plan_batches,
)

BINANCE_TRADES = AssetKey("binance_trades")
_FAILED = {DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED, DagsterRunStatus.CANCELING}


def run_statuses(instance: DagsterInstance, run_keys: list[str]) -> dict[str, str]:
    """active / failed / succeeded for each run key that has a run."""
    statuses: dict[str, str] = {}
    for key in run_keys:
        runs = instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: key}), limit=1)
        if not runs:
            continue
        status = runs[0].status
        statuses[key] = RUN_FAILED if status in _FAILED else RUN_SUCCEEDED if status == DagsterRunStatus.SUCCESS else RUN_ACTIVE
    return statuses


def run_request(batch: OffsetRange, run_key: str, attempt: int) -> RunRequest:
    """The run for one offset range: the range in run config, and tags to find it by."""
    return RunRequest(
        run_key=run_key,
        run_config={"ops": {"binance_trades": {"config": {
            "topic": batch.topic, "partition": batch.partition,
            "start_offset": batch.start, "end_offset": batch.end,
        }}}},
        tags={
            "k2/kafka-partition": f"{batch.topic}-{batch.partition}",
            "k2/offset-range": f"{batch.start}-{batch.end}",
            "k2/attempt": str(attempt),
        },
    )


def check_evaluation(outcome: CheckOutcome) -> AssetCheckEvaluation:
    return AssetCheckEvaluation(
        asset_key=BINANCE_TRADES,
        check_name=outcome.check_name,
        passed=outcome.passed,
        severity=outcome.severity,
        metadata=outcome.metadata,
    )


def evaluate_stream(
    instance: DagsterInstance,
    cursor_json: str | None,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    sink: TradeSinkResource,
) -> SensorResult:
    """One tick: read offsets, plan ranges, report checks. Also used by `k2 demo` and the tests."""
    cursor = StreamCursor.from_json(cursor_json)
    snapshot = StreamSnapshot.read(kafka, iceberg, sink.topic)
    statuses = run_statuses(instance, [flight.run_key for flight in cursor.in_flight.values()])
    planned = plan_batches(snapshot, cursor, sink.max_batch_messages, statuses, sink.run_retry_after_seconds)
    outcomes = [lag_evaluation(snapshot, sink), baseline_evaluation(snapshot)]
    return SensorResult(
        run_requests=[run_request(batch, key, attempt) for batch, key, attempt in planned],
        cursor=cursor.to_json(),
        asset_events=[check_evaluation(outcome) for outcome in outcomes],
    )


@sensor(
    name="binance_stream_sensor",
    job=binance_trades_job,
    minimum_interval_seconds=int(os.environ.get("K2_STREAM_SENSOR_INTERVAL_S", "5")),
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests a micro-batch run per Kafka partition as trades arrive; reports consumer lag "
    "and offset-baseline checks on binance_trades every tick.",
)
def binance_stream_sensor(
    context: SensorEvaluationContext, kafka: KafkaResource, iceberg: IcebergResource, sink: TradeSinkResource
) -> SensorResult:
    return evaluate_stream(context.instance, context.cursor, kafka, iceberg, sink)
