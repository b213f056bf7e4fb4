"""The stream sensor: watches the Binance topic and the table, requests micro-batch runs,
and reports lag, offset-baseline and degradation checks every tick.

A tick only reads offsets (Kafka end offsets, the table's committed offsets and pending
ranges, the dead-letter topic's end offsets), the status of the runs it requested and the
latest materialisations' metadata: it stays far below the sensor timeout; the work is in the runs.

A tick is three steps: ``observe`` (every read, here) -> ``decide`` -> ``report`` (both pure, in
``stream_rules``); ``evaluate_stream`` composes them into the SensorResult and sets the metrics.

Degradation, each tick: lag and memory -> DegradationManager (state in the cursor's
``degradation``) -> level; a transition is logged with its cause; the level, lag and
backlogs are set as Prometheus metrics; the level travels to each requested run in its config.
CIRCUIT_BREAK requests nothing but one probe round per cooldown; at SOFT or below, pending
(deferred and spilled) ranges get ``mode: recover`` runs.

Following (``TradeSinkResource.follow_seconds`` > 0, as `k2 run` sets it): at NORMAL with nothing
in flight or pending, the sensor requests one long-running ``mode: follow`` run for the topic instead
of a run per range, and supervises it: while it runs no range is requested; when it ends (its time
is up, it fell behind, memory rose, or it died) the next tick plans again, with ranges at the
current level or a new follower.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

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
from kafka import TopicPartition

from k2_resources import metrics
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel, system_memory_percent
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import dead_letter_topic
from k2_resources.sink.offsets import DEFERRED, SPILLED, OffsetRange
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_rules import (
    FOLLOW,
    INGEST,
    RUN_ACTIVE,
    RUN_FAILED,
    RUN_SUCCEEDED,
    CheckOutcome,
    Decision,
    Observation,
    StreamCursor,
    StreamSettings,
    StreamSnapshot,
    decide,
    follower_run_keys,
    recovery_run_keys,
    report,
)

_logger = logging.getLogger("k2.stream_sensor")

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
        statuses[key] = (
            RUN_FAILED if status in _FAILED else RUN_SUCCEEDED if status == DagsterRunStatus.SUCCESS else RUN_ACTIVE
        )
    return statuses


def run_request(batch: OffsetRange, run_key: str, attempt: int, level: int = 0, mode: str = INGEST) -> RunRequest:
    """The run for one offset range: the range, degradation level and mode in run config, and tags to find it by."""
    return RunRequest(
        run_key=run_key,
        run_config={
            "ops": {
                "binance_trades": {
                    "config": {
                        "topic": batch.topic,
                        "partition": batch.partition,
                        "start_offset": batch.start,
                        "end_offset": batch.end,
                        "degradation_level": int(level),
                        "mode": mode,
                    }
                }
            }
        },
        tags={
            "k2/kafka-partition": f"{batch.topic}-{batch.partition}",
            "k2/offset-range": f"{batch.start}-{batch.end}",
            "k2/attempt": str(attempt),
            "k2/degradation-level": DegradationLevel(level).name,
            "k2/mode": mode,
        },
    )


def follow_request(topic: str, run_key: str, sink: TradeSinkResource) -> RunRequest:
    """The topic's follower (k2_resources/sink/follow.py): every partition, committed each
    ``follow_interval_seconds`` for ``follow_seconds``; each commit is a materialisation with its range."""
    return RunRequest(
        run_key=run_key,
        run_config={
            "ops": {
                "binance_trades": {
                    "config": {
                        "topic": topic,
                        "mode": FOLLOW,
                        "degradation_level": 0,
                        "follow_seconds": float(sink.follow_seconds),
                        "follow_interval_seconds": float(sink.follow_interval_seconds),
                        "max_batch_messages": int(sink.max_batch_messages),
                    }
                }
            }
        },
        tags={
            # One follower per topic at a time (dagster.yaml's limit per value); the sensor requests
            # no range of the topic while it runs.
            "k2/kafka-partition": f"{topic}-follow",
            "k2/offset-range": "follow",
            "k2/degradation-level": DegradationLevel.NORMAL.name,
            "k2/mode": FOLLOW,
        },
    )


def dead_letter_total(kafka: KafkaResource, topic: str) -> int:
    """Messages ever written to ``topic`` (sum of its end offsets); 0 when it does not exist yet."""
    consumer = kafka.consumer()
    try:
        if topic not in consumer.topics():
            return 0  # asking for its partitions could auto-create it
        partitions = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.end_offsets([TopicPartition(topic, p) for p in partitions]).values())
    finally:
        consumer.close()


def latest_batch_gaps(instance: DagsterInstance, topic: str, limit: int = 30) -> dict[int, dict[str, Any]]:
    """Sequence gaps of the newest micro-batch materialisation per partition of ``topic``."""
    latest: dict[int, dict[str, Any]] = {}
    records = instance.fetch_materializations(BINANCE_TRADES, limit=limit).records
    for record in records:  # newest first
        materialization = record.asset_materialization
        if materialization is None:
            continue
        meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
        if meta.get("topic") != topic or "sequence_gaps_by_symbol" not in meta:
            continue
        partition = int(meta["partition"])
        if partition not in latest:
            latest[partition] = {
                "range": f"{meta['start_offset']}-{meta['end_offset']}",
                "gaps": json.loads(meta["sequence_gaps_by_symbol"]),
            }
    return latest


def check_evaluation(outcome: CheckOutcome) -> AssetCheckEvaluation:
    return AssetCheckEvaluation(
        asset_key=BINANCE_TRADES,
        check_name=outcome.check_name,
        passed=outcome.passed,
        severity=outcome.severity,
        metadata=outcome.metadata,
    )


def observe(
    instance: DagsterInstance,
    cursor: StreamCursor,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    sink: TradeSinkResource,
    degradation: DegradationResource,
    memory_percent: Callable[[], float] = system_memory_percent,
) -> Observation:
    """Every read of one tick: offsets and pending ranges, the in-flight runs' statuses, memory,
    dead letters, the latest batches' sequence gaps and the spill folder's backlog."""
    dlq = dead_letter_topic(sink.topic)
    return Observation(
        snapshot=StreamSnapshot.read(kafka, iceberg, sink.topic),
        run_status=run_statuses(
            instance,
            [flight.run_key for flight in cursor.in_flight.values()]
            + recovery_run_keys(cursor)
            + follower_run_keys(cursor),
        ),
        memory_percent=memory_percent(),
        dead_letter_topic=dlq,
        dead_letters=dead_letter_total(kafka, dlq),
        batch_gaps=latest_batch_gaps(instance, sink.topic),
        spill_files=degradation.spill_store().backlog(),
    )


def publish_metrics(observation: Observation, decision: Decision) -> None:
    """The level, per-partition lag and backlogs as Prometheus gauges."""
    snapshot = observation.snapshot
    metrics.DEGRADATION_LEVEL.set(int(decision.level))
    for partition in snapshot.end_offsets:
        metrics.CONSUMER_LAG.labels(snapshot.topic, str(partition)).set(snapshot.lag(partition))
    metrics.DEFERRED_RANGES.set(len(snapshot.pending_of(DEFERRED)))
    metrics.SPILLED_BATCHES.set(len(snapshot.pending_of(SPILLED)))


def evaluate_stream(
    instance: DagsterInstance,
    cursor_json: str | None,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    sink: TradeSinkResource,
    degradation: DegradationResource | None = None,
    log: Any = None,
    clock: Callable[[], float] = time.time,
    memory_percent: Callable[[], float] = system_memory_percent,
) -> SensorResult:
    """One tick: observe, decide, report; then the SensorResult (runs, next cursor, check evaluations).

    Also used by `k2 demo` and the tests; ``log`` is the sensor's context.log (default: a logger).
    """
    log = log or _logger
    degradation = degradation or DegradationResource()
    settings = StreamSettings.of(sink, degradation)
    cursor = StreamCursor.from_json(cursor_json)
    observation = observe(instance, cursor, kafka, iceberg, sink, degradation, memory_percent)
    decision = decide(observation, cursor, settings, clock())
    told = report(observation, decision, settings)
    for line in told.log_lines:
        getattr(log, line.level)(line.message)
    publish_metrics(observation, decision)
    return SensorResult(
        run_requests=[
            follow_request(run.range.topic, run.run_key, sink)
            if run.mode == FOLLOW
            else run_request(run.range, run.run_key, run.attempt, run.level, run.mode)
            for run in decision.runs
        ],
        cursor=decision.cursor.to_json(),
        asset_events=[check_evaluation(outcome) for outcome in told.outcomes],
    )


@sensor(
    name="binance_stream_sensor",
    job_name="binance_trades_microbatch",  # by name: the job is defined with the assets, a layer above
    minimum_interval_seconds=int(os.environ.get("K2_STREAM_SENSOR_INTERVAL_S", "5")),
    default_status=DefaultSensorStatus.RUNNING,
    description="Requests a micro-batch run per Kafka partition as trades arrive, at the current degradation "
    "level, and recovery runs for deferred and spilled ranges; reports consumer lag, offset-baseline, "
    "degradation level, backlog, sequence-gap, dead-letter and retention-loss checks on binance_trades every tick.",
)
def binance_stream_sensor(
    context: SensorEvaluationContext,
    kafka: KafkaResource,
    iceberg: IcebergResource,
    sink: TradeSinkResource,
    degradation: DegradationResource,
) -> SensorResult:
    return evaluate_stream(context.instance, context.cursor, kafka, iceberg, sink, degradation, log=context.log)
