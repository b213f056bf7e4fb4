"""Drive the stream sensor and its runs in-process, against a real Dagster instance.

This is what the Dagster daemon does for the sensor (evaluate a tick, store its check
evaluations, launch the requested runs), done synchronously so that `k2 demo` and the
integration tests can run the real sensor and the real micro-batch job to a known end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from dagster import (
    AssetCheckEvaluation,
    DagsterInstance,
    Definitions,
    ExecuteInProcessResult,
    RunRequest,
    SensorResult,
    build_sensor_context,
)
from dagster._core.storage.tags import RUN_KEY_TAG
from kafka.errors import KafkaError

SENSOR_NAME = "binance_stream_sensor"


@dataclass
class DriveReport:
    """What the driven sensor did."""

    ticks: int = 0
    runs: int = 0
    failed_runs: int = 0
    failed_ticks: int = 0  # ticks that met a retriable Kafka error (a broker failing over) and were asked again
    last_tick_error: str | None = None
    run_errors: list[str] = field(default_factory=list)  # why each failed run failed (its first step failure)
    cursor: str | None = None
    last_checks: dict[str, dict] = field(default_factory=dict)  # check name -> {passed, severity, metadata}

    @property
    def lag(self) -> int | None:
        check = self.last_checks.get("consumer_lag")
        return None if check is None else int(check["metadata"]["lag_messages"])


def tick(instance: DagsterInstance, defs: Definitions, cursor: str | None) -> SensorResult:
    """Evaluate one sensor tick and store its asset-check evaluations in the instance."""
    sensor = defs.resolve_sensor_def(SENSOR_NAME)
    resources = defs.get_repository_def().get_top_level_resources()
    with build_sensor_context(instance=instance, cursor=cursor, resources=resources, definitions=defs) as context:
        result = sensor(context)
    if not isinstance(result, SensorResult):  # the stream sensor always returns one
        raise TypeError(f"{SENSOR_NAME} returned {type(result).__name__}, not a SensorResult")
    for event in result.asset_events:
        instance.report_runless_asset_event(event)
    return result


def _run_tags(request: RunRequest) -> dict[str, str]:
    if request.run_key is None:  # the stream sensor keys every request
        raise ValueError(f"a run request of {SENSOR_NAME} has no run key: {request}")
    return {**request.tags, RUN_KEY_TAG: request.run_key}


def failure_of(outcome: ExecuteInProcessResult) -> str:
    """The first step failure of a failed run, as ``step: error``."""
    for event in outcome.all_events:
        if event.is_step_failure and event.step_failure_data.error is not None:
            return f"{event.step_key}: {event.step_failure_data.error.message.strip()}"
    return f"run {outcome.run_id} failed without a step failure"


def execute_requests(
    instance: DagsterInstance, defs: Definitions, result: SensorResult, extra_run_config: dict | None = None
) -> tuple[int, list[str]]:
    """Run the tick's run requests in-process, one after another; returns (runs, why each failed run failed).

    ``extra_run_config`` is merged into each run's config (e.g. loggers, to keep a demo quiet).
    """
    runs = 0
    failed: list[str] = []
    for request in result.run_requests or []:
        job = defs.resolve_job_def(request.job_name or "binance_trades_microbatch")
        outcome = job.execute_in_process(
            run_config={**request.run_config, **(extra_run_config or {})},
            instance=instance,
            tags=_run_tags(request),
            raise_on_error=False,
        )
        runs += 1
        if not outcome.success:
            failed.append(failure_of(outcome))
    return runs, failed


def checks_of(result: SensorResult) -> dict[str, dict]:
    """The tick's check evaluations: check name -> {passed, severity, metadata (plain values)}."""
    return {
        event.check_name: {
            "passed": event.passed,
            "severity": event.severity.value,
            "metadata": {key: getattr(value, "value", value) for key, value in event.metadata.items()},
        }
        for event in result.asset_events
        if isinstance(event, AssetCheckEvaluation)
    }


def drive(
    instance: DagsterInstance,
    defs: Definitions,
    until: Callable[[DriveReport], bool],
    timeout_s: float = 300.0,
    cursor: str | None = None,
    idle_pause_s: float = 0.2,
    run_log_level: str = "INFO",
) -> DriveReport:
    """Tick, run what was requested, and repeat until ``until(report)`` or the deadline."""
    report = DriveReport(cursor=cursor)
    deadline = time.monotonic() + timeout_s
    loggers = {"loggers": {"console": {"config": {"log_level": run_log_level}}}}
    while time.monotonic() < deadline:
        try:
            result = tick(instance, defs, report.cursor)
        except KafkaError as exc:
            if not exc.retriable:
                raise
            # As the daemon does: the tick fails and the next one asks again (a broker killed a moment
            # ago is still named in the metadata until the cluster fences it); others fail at once.
            report.failed_ticks += 1
            report.last_tick_error = f"{type(exc).__name__}: {exc}"
            time.sleep(idle_pause_s)
            continue
        report.ticks += 1
        report.cursor = result.cursor
        report.last_checks = checks_of(result)
        runs, failed = execute_requests(instance, defs, result, loggers)
        report.runs += runs
        report.failed_runs += len(failed)
        report.run_errors.extend(failed)
        if not result.run_requests:
            if until(report):
                return report
            time.sleep(idle_pause_s)  # nothing to do this tick: the next tick is a fresh look
    raise TimeoutError(f"the stream did not reach the expected state within {timeout_s:.0f}s: {report}")
