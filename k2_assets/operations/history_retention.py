"""Retention of the stream's Dagster history: a job and its nightly schedule (on by default).

One run per micro-batch and one check evaluation per check per sensor tick (5 s) would grow the
Dagster instance without end; see ``k2_resources/operations/history_retention.py`` for what is kept
and why, and docs/operations.md ("Dagster history retention").
"""

from dagster import Config, DefaultScheduleStatus, OpExecutionContext, ScheduleDefinition, job, op
from pydantic import Field

from k2_assets.analytics.live_bars import binance_live_bars_refresh
from k2_assets.degradation.jobs import symbol_tiers_job
from k2_resources.operations.history_retention import (
    RetentionPolicy,
    prune_runs,
    prune_stream_history,
    stream_check_keys,
)
from k2_sensors.binance.stream_sensor import BINANCE_TRADES

MICROBATCH_JOB = "binance_trades_microbatch"
# The other jobs a schedule starts all day (hourly tiers; live bars every minute once switched on):
# their runs are pruned by the same policy (the nightly jobs add a run a day each).
SCHEDULED_JOBS = (symbol_tiers_job.name, binance_live_bars_refresh.name)


class HistoryRetentionConfig(Config):
    """Ages in hours; the counts are floors kept whatever their age."""

    run_retention_hours: float = Field(default=RetentionPolicy.run_retention_hours, gt=0)
    min_runs_to_keep: int = Field(default=RetentionPolicy.min_runs_to_keep, ge=1)
    check_retention_hours: float = Field(default=RetentionPolicy.check_retention_hours, gt=0)
    min_evaluations_to_keep: int = Field(default=RetentionPolicy.min_evaluations_to_keep, ge=1)


@op(tags={"k2/kind": "maintenance"})
def prune_dagster_history(context: OpExecutionContext, config: HistoryRetentionConfig) -> None:
    """Delete old finished micro-batch runs (the followers' included), the stream sensor's old check
    evaluations, and old finished runs of the jobs schedules start all day."""
    policy = RetentionPolicy(
        run_retention_hours=config.run_retention_hours,
        min_runs_to_keep=config.min_runs_to_keep,
        check_retention_hours=config.check_retention_hours,
        min_evaluations_to_keep=config.min_evaluations_to_keep,
    )
    report = prune_stream_history(
        context.instance, MICROBATCH_JOB, stream_check_keys(context.instance, BINANCE_TRADES), policy
    )
    scheduled = {name: prune_runs(context.instance, name, policy) for name in SCHEDULED_JOBS}
    context.log.info(
        f"deleted {report.runs_deleted} micro-batch run(s), {report.total_evaluations_deleted} "
        f"check evaluation(s): {report.evaluations_deleted}, and scheduled runs: {scheduled}"
    )


@job(
    tags={"k2/kind": "maintenance"},
    description="Delete micro-batch runs, stream-sensor check evaluations and the runs of all-day schedules "
    "past their retention (the newest ones and unfinished runs always stay).",
)
def dagster_history_retention():
    prune_dagster_history()


dagster_history_retention_nightly = ScheduleDefinition(
    name="dagster_history_retention_nightly",
    job=dagster_history_retention,
    cron_schedule="47 3 * * *",
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Keeps the Dagster instance bounded under the stream: one run per micro-batch and one check "
    "evaluation per check every 5 s would otherwise grow it without end.",
)
