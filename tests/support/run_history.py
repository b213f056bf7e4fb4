"""A long life of the stream in a Dagster instance, written directly: micro-batch runs, their
events and materialisations, and the stream sensor's check evaluations.

Executing 20,000 micro-batch runs takes hours; this writes what those runs and the sensor's
ticks leave in the instance's storage, in the same shape, in batches:

- one run per micro-batch of the real ``binance_trades_microbatch`` job (its job and execution
  plan snapshots registered once by ``create_run_for_job``), with the tags the daemon gives a
  run the stream sensor requested (``run_request``'s tags, the job's tags, the sensor name and
  the run key), in status SUCCESS with start and end times;
- the run's status events (enqueued, dequeued, starting, start, success), its
  ASSET_MATERIALIZATION_PLANNED and its ASSET_MATERIALIZATION with the metadata the
  ``binance_trades`` asset emits (the offset range, rows written, sequence gaps, ...), mirrored
  into the index shard as Dagster's SQLite event log does, and the asset's latest materialisation;
- per round of micro-batches (one per partition, as one tick requests them) that tick's
  runless check evaluations (``consumer_lag`` etc.), made by the sensor's own ``report`` rules,
  in the runless shard, the index shard and the asset-check executions table.

Per-run event shards (``history/runs/<run_id>.db``) are not written: nothing the sensor or the
asset page reads is in them (they hold each run's own log, read only when the run is opened),
and creating 20,000 SQLite files would be most of the cost. Everything else goes through the
storages' own insert statements and tables, many rows per transaction; a test reads it back
through the public instance API (``get_runs``, ``fetch_materializations``, check history).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import sqlalchemy as db
from dagster import AssetMaterialization, DagsterInstance, DagsterRunStatus, Definitions
from dagster._core.definitions.data_version import CODE_VERSION_TAG, DATA_VERSION_TAG
from dagster._core.events import (
    AssetMaterializationPlannedData,
    DagsterEvent,
    DagsterEventType,
    StepMaterializationData,
)
from dagster._core.events.log import EventLogEntry
from dagster._core.instance.utils import RUNLESS_JOB_NAME, RUNLESS_RUN_ID
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.storage.event_log.schema import AssetCheckExecutionsTable, SqlEventLogStorageTable
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster_shared.record import copy
from dagster_shared.serdes import serialize_value

from k2_resources.degradation.resource import DegradationResource
from k2_resources.trades.offsets import OffsetRange
from k2_resources.trades.sink_settings import TradeSinkResource
from k2_sensors.binance.stream_rules import (
    InFlight,
    Observation,
    StreamCursor,
    StreamSettings,
    StreamSnapshot,
    decide,
    report,
)
from k2_sensors.binance.stream_sensor import BINANCE_TRADES, check_evaluation, run_request

JOB_NAME = "binance_trades_microbatch"
SENSOR_NAME = "binance_stream_sensor"
STEP_KEY = "binance_trades"
RUN_STATUS_EVENTS = (
    DagsterEventType.PIPELINE_ENQUEUED,
    DagsterEventType.PIPELINE_DEQUEUED,
    DagsterEventType.PIPELINE_STARTING,
    DagsterEventType.PIPELINE_START,
)


@dataclass(frozen=True)
class RunHistory:
    """What was written: per partition the committed end and the newest run's key and range."""

    topic: str
    runs: int
    check_evaluations: int
    seconds: float
    ends: dict[int, int]  # partition -> end offset of its newest micro-batch
    newest_run_keys: dict[int, str]  # partition -> run key of its newest micro-batch
    newest_ranges: dict[int, tuple[int, int]]  # partition -> (start, end) of its newest micro-batch
    first_timestamp: float
    last_timestamp: float

    def cursor(self) -> StreamCursor:
        """The sensor's cursor after the newest run of each partition was requested."""
        return StreamCursor(in_flight={
            p: InFlight(start, end, self.newest_run_keys[p], self.last_timestamp, 1)
            for p, (start, end) in self.newest_ranges.items()
        })


def materialization_metadata(batch: OffsetRange, rows: int, snapshot_id: int) -> dict:
    """The metadata ``binance_trades`` attaches to a NORMAL-level ingest materialisation."""
    return {
        "mode": "ingest", "degradation_level": "NORMAL", "enriched": True, "deferred_rows": 0, "spilled_rows": 0,
        "sequence_gaps": 0, "sequence_gaps_by_symbol": json.dumps({}), "topic": batch.topic,
        "partition": batch.partition, "start_offset": batch.start, "end_offset": batch.end,
        "rows_written": rows, "dead_lettered": 0, "already_committed": False,
        "snapshot_id": str(snapshot_id), "commit_seconds": 0.183,
    }


class RunHistoryWriter:
    """Appends micro-batch runs (and the ticks that requested them) to an instance, in batches."""

    def __init__(self, instance: DagsterInstance, defs: Definitions, topic: str, partitions: int,
                 offsets_per_run: int = 5, tick_interval_s: float = 5.0) -> None:
        self.instance = instance
        self.topic = topic
        self.partitions = partitions
        self.offsets_per_run = offsets_per_run
        self.tick_interval_s = tick_interval_s
        job = defs.resolve_job_def(JOB_NAME)
        first = run_request(OffsetRange(topic, 0, 0, offsets_per_run), "template", 1)
        # Registers the job and execution-plan snapshots once; every generated run points at them.
        self._template = instance.create_run_for_job(job, run_config=first.run_config, tags=dict(first.tags))
        instance.delete_run(self._template.run_id)
        self._job_tags = dict(job.tags or {})
        settings = StreamSettings.of(TradeSinkResource(topic=topic), DegradationResource())
        self._settings = settings
        self._ends = {p: 0 for p in range(partitions)}
        self._newest: dict[int, tuple[str, int, int]] = {}
        self._written = 0
        self._checks = 0
        self._first_ts: float | None = None
        self._last_ts = 0.0

    # -- one micro-batch -----------------------------------------------------------------------

    def _run(self, batch: OffsetRange, ts: float) -> tuple[DagsterRun, dict]:
        """The run the daemon creates for the sensor's request of ``batch``, finished, as its ``runs`` row."""
        run_key = f"{batch.key}#1"
        request = run_request(batch, run_key, 1)
        tags = {**self._job_tags, **request.tags, SENSOR_NAME_TAG: SENSOR_NAME, RUN_KEY_TAG: run_key}
        run = copy(self._template, run_id=str(uuid.uuid4()), run_config=request.run_config, tags=tags,
                   status=DagsterRunStatus.SUCCESS)
        # The columns SqlRunStorage.add_run writes, then what the start and success events update.
        values = dict(run_id=run.run_id, pipeline_name=run.job_name, status=run.status.value,
                      run_body=serialize_value(run), snapshot_id=run.job_snapshot_id, partition=None,
                      partition_set=None, backfill_id=None, create_timestamp=_utc(ts),
                      update_timestamp=_utc(ts + 3.0), start_time=ts + 1.0, end_time=ts + 3.0)
        return run, values

    def _run_events(self, run: DagsterRun, batch: OffsetRange, ts: float) -> list[EventLogEntry]:
        def entry(event: DagsterEvent, at: float, step_key: str | None = None) -> EventLogEntry:
            return EventLogEntry(error_info=None, level=logging.DEBUG, user_message=event.message or "",
                                 run_id=run.run_id, timestamp=at, step_key=step_key, job_name=JOB_NAME,
                                 dagster_event=event)

        events = [entry(DagsterEvent(event_type_value=kind.value, job_name=JOB_NAME, message=kind.value), ts + i * 0.2)
                  for i, kind in enumerate(RUN_STATUS_EVENTS)]
        events.append(entry(DagsterEvent(
            event_type_value=DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value, job_name=JOB_NAME,
            event_specific_data=AssetMaterializationPlannedData(BINANCE_TRADES),
            message=f"{JOB_NAME} intends to materialize asset binance_trades"), ts + 0.1))
        materialization = AssetMaterialization(
            asset_key=BINANCE_TRADES,
            metadata=materialization_metadata(batch, batch.end - batch.start, 10_000 + self._written),
            tags={DATA_VERSION_TAG: uuid.uuid4().hex, CODE_VERSION_TAG: run.run_id},
        )
        events.append(entry(DagsterEvent(
            event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value, job_name=JOB_NAME, step_key=STEP_KEY,
            event_specific_data=StepMaterializationData(materialization),
            message="Materialized value binance_trades."), ts + 2.5, STEP_KEY))
        events.append(entry(DagsterEvent(event_type_value=DagsterEventType.PIPELINE_SUCCESS.value, job_name=JOB_NAME,
                                          message=f'Finished execution of run for "{JOB_NAME}".'), ts + 3.0))
        return events

    def _tick_checks(self, ts: float, lag: int) -> list[EventLogEntry]:
        """The check evaluations one sensor tick reports, made by the sensor's own rules."""
        ends = {p: self._ends[p] + lag for p in range(self.partitions)}
        snapshot = StreamSnapshot(self.topic, ends, dict(self._ends))
        observation = Observation(snapshot=snapshot, memory_percent=40.0, dead_letter_topic=f"{self.topic}.dlq")
        told = report(observation, decide(observation, StreamCursor(), self._settings, ts), self._settings)
        return [EventLogEntry(
            error_info=None, level=logging.DEBUG, user_message="", run_id=RUNLESS_RUN_ID, timestamp=ts,
            step_key=None, job_name=RUNLESS_JOB_NAME,
            dagster_event=DagsterEvent(event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION.value,
                                       job_name=RUNLESS_JOB_NAME, event_specific_data=check_evaluation(o)),
        ) for o in told.outcomes]

    # -- many at once --------------------------------------------------------------------------

    def append(self, runs: int, batch_size: int = 500, now: float | None = None) -> RunHistory:
        """Append ``runs`` micro-batches (round robin over the partitions, one tick each), the newest
        ending about ``now``; returns what the history holds so far."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        step = self.tick_interval_s / self.partitions
        first_ts = now - runs * step
        for begin in range(0, runs, batch_size):
            rows, events, checks = [], [], []
            for index in range(begin, min(runs, begin + batch_size)):
                ts = first_ts + index * step
                partition = self._written % self.partitions
                start = self._ends[partition]
                batch = OffsetRange(self.topic, partition, start, start + self.offsets_per_run)
                run, values = self._run(batch, ts)
                rows.append((run, values))
                events += self._run_events(run, batch, ts)
                if partition == 0:  # a tick requests one batch per partition: one tick's checks per round
                    checks += self._tick_checks(ts - 0.5, lag=self.offsets_per_run)
                self._ends[partition] = batch.end
                self._newest[partition] = (run.tags[RUN_KEY_TAG], batch.start, batch.end)
                self._written += 1
                self._first_ts = ts if self._first_ts is None else self._first_ts
                self._last_ts = ts
            self._insert_runs(rows)
            self._insert_events(events, checks)
            self._checks += len(checks)
        return RunHistory(
            topic=self.topic, runs=self._written, check_evaluations=self._checks,
            seconds=time.perf_counter() - started, ends=dict(self._ends),
            newest_run_keys={p: key for p, (key, _, _) in self._newest.items()},
            newest_ranges={p: (s, e) for p, (_, s, e) in self._newest.items()},
            first_timestamp=self._first_ts or now, last_timestamp=self._last_ts,
        )

    def _insert_runs(self, rows: list[tuple[DagsterRun, dict]]) -> None:
        """What ``add_run`` and the run's status events write in run storage, for many runs in one transaction."""
        with self.instance.run_storage.connect() as conn:
            conn.execute(RunsTable.insert(), [values for _, values in rows])
            conn.execute(RunTagsTable.insert(), [dict(run_id=run.run_id, key=k, value=v)
                                                 for run, _ in rows for k, v in run.tags_for_storage().items()])

    def _insert_events(self, run_events: list[EventLogEntry], checks: list[EventLogEntry]) -> None:
        """What ``store_event`` puts in the index shard (and the runless shard), one transaction each.

        Rows are the storage's own (``_event_to_row``), each event serialised once; storage ids are
        given in order from the index's current maximum (nothing else writes while this runs)."""
        storage = self.instance.event_log_storage
        check_rows = [self._event_row(e) for e in checks]
        with storage.run_connection(RUNLESS_RUN_ID) as conn:  # report_runless_asset_event's own shard
            conn.execute(SqlEventLogStorageTable.insert(), check_rows)
        with storage.index_transaction() as conn:
            next_id = (conn.execute(db.select(db.func.max(SqlEventLogStorageTable.c.id))).scalar() or 0) + 1
            rows = [self._event_row(e) for e in run_events] + [dict(row) for row in check_rows]
            for offset, row in enumerate(rows):
                row["id"] = next_id + offset
            conn.execute(SqlEventLogStorageTable.insert(), rows)
            ids = [row["id"] for row in rows]
            run_ids, check_ids = ids[:len(run_events)], ids[len(run_events):]
            materialized = [(e, i) for e, i in zip(run_events, run_ids)
                            if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION]
            planned = [(e, i) for e, i in zip(run_events, run_ids)
                       if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION_PLANNED]
            storage._store_asset_event_tags(conn, [e for e, _ in materialized], [i for _, i in materialized])
            for event, event_id in (planned[-1], materialized[-1]):  # the asset's latest, as the last store_event leaves it
                storage._store_asset_event(conn, event, event_id)
            conn.execute(AssetCheckExecutionsTable.insert(),
                         [self._check_row(e, row, i) for e, row, i in zip(checks, check_rows, check_ids)])

    def _event_row(self, event: EventLogEntry) -> dict:
        return self.instance.event_log_storage._event_to_row(event)

    @staticmethod
    def _check_row(event: EventLogEntry, row: dict, event_id: int) -> dict:
        """The row ``_store_runless_asset_check_evaluation`` inserts for one evaluation."""
        evaluation = event.get_dagster_event().event_specific_data
        return dict(
            asset_key=evaluation.asset_key.to_string(), check_name=evaluation.check_name, run_id=event.run_id,
            execution_status=(AssetCheckExecutionRecordStatus.SUCCEEDED.value if evaluation.passed
                              else AssetCheckExecutionRecordStatus.FAILED.value),
            evaluation_event=row["event"], evaluation_event_timestamp=row["timestamp"],
            evaluation_event_storage_id=event_id, materialization_event_storage_id=None, partition=None,
        )


def _utc(ts: float) -> datetime:
    """A naive UTC datetime, as Dagster's SQL storages store timestamps."""
    return datetime.fromtimestamp(ts, timezone.utc).replace(tzinfo=None)
