"""The stream sensor: watches the Binance topic and the table, requests micro-batch runs,
and reports lag, offset-baseline and degradation checks every tick.

A tick only reads offsets (Kafka end offsets, the table's committed offsets and pending
ranges, the dead-letter topic's end offsets), the status of the runs it requested and the
latest materialisations' metadata: it stays far below the sensor timeout; the work is in the runs.

A tick is three steps: ``observe`` (every read, in ``observe``) -> ``decide`` (pure, in
``stream_planning``) -> ``report`` (pure, in ``stream_checks``); ``evaluate_stream`` composes them
into the SensorResult and sets the metrics. The cursor is ``stream_cursor``'s.

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

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from dagster import (
    AssetCheckEvaluation,
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from k2_resources import metrics
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel, system_memory_percent
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.offsets import DEFERRED, SPILLED, OffsetRange
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.observe import BINANCE_TRADES, observe
from k2_sensors.binance.stream_checks import CheckOutcome, report
from k2_sensors.binance.stream_cursor import StreamCursor
from k2_sensors.binance.stream_observation import Observation
from k2_sensors.binance.stream_planning import FOLLOW, INGEST, Decision, StreamSettings, decide

__all__ = ["BINANCE_TRADES", "binance_stream_sensor", "evaluate_stream", "run_request", "follow_request"]

_logger = logging.getLogger("k2.stream_sensor")


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
    ``follow_interval_seconds`` for ``follow_seconds``; one materialisation per ``follow_report_seconds``."""
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
                        "follow_report_seconds": float(sink.follow_report_seconds),
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


def check_evaluation(outcome: CheckOutcome) -> AssetCheckEvaluation:
    return AssetCheckEvaluation(
        asset_key=BINANCE_TRADES,
        check_name=outcome.check_name,
        passed=outcome.passed,
        severity=outcome.severity,
        metadata=outcome.metadata,
    )


def publish_metrics(observation: Observation, decision: Decision) -> None:
    """The level, per-partition lag and backlogs as Prometheus gauges."""
    offsets = observation.offsets
    metrics.DEGRADATION_LEVEL.set(int(decision.level))
    for partition in offsets.end_offsets:
        metrics.CONSUMER_LAG.labels(offsets.topic, str(partition)).set(offsets.lag(partition))
    metrics.DEFERRED_RANGES.set(len(offsets.pending_of(DEFERRED)))
    metrics.SPILLED_BATCHES.set(len(offsets.pending_of(SPILLED)))


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
