"""Retention of the Dagster history the stream leaves: old micro-batch runs and the stream
sensor's old check evaluations.

The stream writes one run per micro-batch and, every tick (5 s), one evaluation per check on
``binance_trades``: about 138K check evaluations a day, many more rows than runs. The stream
sensor's own reads are bounded (run-key look-ups by tag with a limit, the newest 30
materialisations), but Dagster answers "the latest evaluation of a check" (the exporter, the alert
sensor, the asset's Checks tab) and "the evaluation history" by visiting every stored evaluation
of that check, so those slow down as the history grows (measured in tests/benchmarks/bench_soak.py).

What is kept, whatever the age:

- every run not finished (queued, started: the sensor's in-flight runs) and the newest
  ``min_runs_to_keep`` finished micro-batch runs, with their materialisations (the sequence-gap
  check reads the newest per partition; the exporter reads materialisations by cursor, long
  before they are old);
- the newest ``min_evaluations_to_keep`` evaluations of every check (the exporter reads at most
  500 per poll; the alert sensor the latest); evaluations made inside runs (a check run on
  demand) are never deleted here;
- the audit record: which offset ranges were committed is in ``market.trades`` itself (each
  commit's snapshot summary and the committed-offset table property), not in Dagster.

Deletes go through ``DagsterInstance.delete_run`` for runs; for runless check evaluations, which
Dagster has no delete call for, through the event-log storage's own tables (the execution row,
its event in the index, and in the SQLite storage the runless shard's copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import sqlalchemy as db
from dagster import AssetCheckKey, AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from dagster._core.events import DagsterEventType
from dagster._core.instance.utils import RUNLESS_RUN_ID
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable, SqlEventLogStorageTable
from dagster._core.storage.event_log.sql_event_log import SqlEventLogStorage

from k2_resources.errors import K2Error

FINISHED = [DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED]
events = SqlEventLogStorageTable


@dataclass(frozen=True)
class RetentionPolicy:
    """How much Dagster history of the stream to keep (ages in hours, counts as floors)."""

    run_retention_hours: float = 7 * 24
    min_runs_to_keep: int = 2_000
    check_retention_hours: float = 48
    min_evaluations_to_keep: int = 2_000
    batch_size: int = 500


@dataclass(frozen=True)
class RetentionReport:
    runs_deleted: int
    evaluations_deleted: dict[str, int]  # check name -> evaluations deleted

    @property
    def total_evaluations_deleted(self) -> int:
        return sum(self.evaluations_deleted.values())


def sql_event_log(instance: DagsterInstance) -> SqlEventLogStorage:
    """The instance's event log as SQL storage (SQLite or Postgres), which pruning deletes from."""
    storage = instance.event_log_storage
    if not isinstance(storage, SqlEventLogStorage):
        raise K2Error(
            f"Dagster history retention needs SQL event log storage (SQLite or Postgres), not "
            f"{type(storage).__name__}: point DAGSTER_HOME's dagster.yaml at one of them"
        )
    return storage


def prune_runs(instance: DagsterInstance, job_name: str, policy: RetentionPolicy, now: datetime | None = None) -> int:
    """Delete finished runs of ``job_name`` last updated before the cut-off, except the newest
    ``min_runs_to_keep``; unfinished runs are never deleted. Returns how many were deleted."""
    now = now or datetime.now(UTC)
    cutoff = now - timedelta(hours=policy.run_retention_hours)
    newest = instance.get_run_records(filters=RunsFilter(job_name=job_name), limit=policy.min_runs_to_keep)
    if len(newest) < policy.min_runs_to_keep:
        return 0
    oldest_kept_id = newest[-1].storage_id
    deleted = 0
    while True:
        records = instance.get_run_records(
            filters=RunsFilter(job_name=job_name, statuses=FINISHED, updated_before=cutoff),
            limit=policy.batch_size,
            ascending=True,
        )
        doomed = [r for r in records if r.storage_id < oldest_kept_id]
        for record in doomed:
            instance.delete_run(record.dagster_run.run_id)
        deleted += len(doomed)
        if len(doomed) < policy.batch_size:
            return deleted


def prune_check_evaluations(
    instance: DagsterInstance, check_keys: list[AssetCheckKey], policy: RetentionPolicy, now: datetime | None = None
) -> dict[str, int]:
    """Delete runless evaluations (the sensor's) of each check older than the cut-off, except the
    newest ``min_evaluations_to_keep`` of that check. Returns check name -> evaluations deleted."""
    now = now or datetime.now(UTC)
    cutoff = (now - timedelta(hours=policy.check_retention_hours)).replace(tzinfo=None)  # stored naive UTC
    storage = sql_event_log(instance)
    table = AssetCheckExecutionsTable
    deleted: dict[str, int] = {}
    for key in check_keys:
        of_check = db.and_(table.c.asset_key == key.asset_key.to_string(), table.c.check_name == key.name)
        with storage.index_connection() as conn:
            kept = conn.execute(
                db.select(table.c.id)
                .where(of_check)
                .order_by(table.c.id.desc())
                .offset(policy.min_evaluations_to_keep - 1)
                .limit(1)
            ).scalar()
            if kept is None:
                deleted[key.name] = 0
                continue
            doomed = db.and_(
                of_check,
                table.c.run_id == RUNLESS_RUN_ID,
                table.c.id < kept,
                table.c.evaluation_event_timestamp < cutoff,
            )
            newest_doomed = conn.execute(
                db.select(db.func.max(table.c.evaluation_event_timestamp)).where(doomed)
            ).scalar()
            event_ids = db.select(table.c.evaluation_event_storage_id).where(doomed)
            conn.execute(events.delete().where(events.c.id.in_(event_ids)))
            deleted[key.name] = conn.execute(table.delete().where(doomed)).rowcount
        if newest_doomed is not None and storage.is_run_sharded:
            # The SQLite storage also keeps each runless event in its own shard ("" run id).
            with storage.run_connection(RUNLESS_RUN_ID) as conn:
                conn.execute(
                    events.delete().where(
                        db.and_(
                            events.c.dagster_event_type == DagsterEventType.ASSET_CHECK_EVALUATION.value,
                            events.c.timestamp <= newest_doomed,
                            events.c.event.like(f'%"check_name": "{_like_escape(key.name)}"%', escape="\\"),
                        )
                    )
                )
    return deleted


def stream_check_keys(instance: DagsterInstance, asset_key: AssetKey) -> list[AssetCheckKey]:
    """Every check of ``asset_key`` that has evaluations in the instance (from its check-executions index)."""
    table = AssetCheckExecutionsTable
    with sql_event_log(instance).index_connection() as conn:
        names = (
            conn.execute(db.select(table.c.check_name).where(table.c.asset_key == asset_key.to_string()).distinct())
            .scalars()
            .all()
        )
    return [AssetCheckKey(asset_key, name) for name in sorted(names)]


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def prune_stream_history(
    instance: DagsterInstance,
    job_name: str,
    check_keys: list[AssetCheckKey],
    policy: RetentionPolicy | None = None,
    now: datetime | None = None,
) -> RetentionReport:
    """Both prunings, runs first."""
    policy = policy or RetentionPolicy()
    runs = prune_runs(instance, job_name, policy, now)
    return RetentionReport(runs, prune_check_evaluations(instance, check_keys, policy, now))
