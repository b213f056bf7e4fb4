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

A run and its events differ from the next run's only in a few fields (run id, partition,
offsets, snapshot id, data version, times), and serialising eight Dagster objects per run was
most of the cost. So a run and its events are built and serialised once with sentinel values
in those fields (``_Stencil``), and each run's rows are that text with the sentinels replaced.
The last run of every batch is also built and serialised the ordinary way and must give the
same rows, so the stencil cannot drift from what ``serialize_value`` writes.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

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
from dagster._core.storage.event_log.schema import (
    AssetCheckExecutionsTable,
    AssetEventTagsTable,
    SqlEventLogStorageTable,
)
from dagster._core.storage.runs.schema import RunsTable, RunTagsTable
from dagster._core.storage.tags import RUN_KEY_TAG, SENSOR_NAME_TAG
from dagster_shared.record import copy
from dagster_shared.serdes import serialize_value

from k2_resources.degradation.resource import DegradationResource
from k2_resources.sink.offsets import OffsetRange
from k2_resources.sink.resource import TradeSinkResource
from k2_sensors.binance.stream_checks import report
from k2_sensors.binance.stream_cursor import InFlight, StreamCursor
from k2_sensors.binance.stream_observation import Observation, StreamOffsets
from k2_sensors.binance.stream_planning import StreamSettings, decide
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
# Seconds after the run's creation at which each of its events happens: the status events above,
# then materialisation planned, materialised, success.
STATUS_EVENT_OFFSETS = tuple(i * 0.2 for i in range(len(RUN_STATUS_EVENTS)))
PLANNED_OFFSET, MATERIALIZED_OFFSET, SUCCESS_OFFSET = 0.1, 2.5, 3.0
SNAPSHOT_ID_BASE = 10_000  # the materialisation's snapshot id is this plus the run's index

# Values no real run has, put where the per-run fields go when the stencil is serialised.
_SENTINEL_RUN_ID = "5e471ce1-0000-4000-8000-00000000a11d"
_SENTINEL_DATA_VERSION = "da7a5e471ce1da7a5e471ce1da7a5e47"
_SENTINEL_PARTITION, _SENTINEL_START, _SENTINEL_END, _SENTINEL_SNAPSHOT = 71_000_001, 71_000_002, 71_000_003, 71_000_004
_SENTINEL_TS = 1_111_111_111.125
_EVENT_OFFSETS = (*STATUS_EVENT_OFFSETS, PLANNED_OFFSET, MATERIALIZED_OFFSET, SUCCESS_OFFSET)


def _sentinel_values(run_id: str, batch: OffsetRange, snapshot_id: int, data_version: str, ts: float) -> dict[str, str]:
    """Sentinel text -> this run's text, for every field that differs between runs."""
    values = {
        _SENTINEL_RUN_ID: run_id,
        _SENTINEL_DATA_VERSION: data_version,
        str(_SENTINEL_PARTITION): str(batch.partition),
        str(_SENTINEL_START): str(batch.start),
        str(_SENTINEL_END): str(batch.end),
        str(_SENTINEL_SNAPSHOT): str(snapshot_id),
    }
    values.update({repr(_SENTINEL_TS + offset): repr(ts + offset) for offset in (0.0, 1.0, *_EVENT_OFFSETS)})
    return values


# Longest first, so a sentinel that starts like another is never cut short.
_SENTINEL_PATTERN = re.compile(
    "|".join(
        re.escape(text)
        for text in sorted(
            _sentinel_values(
                _SENTINEL_RUN_ID,
                OffsetRange("t", _SENTINEL_PARTITION, _SENTINEL_START, _SENTINEL_END),
                _SENTINEL_SNAPSHOT,
                _SENTINEL_DATA_VERSION,
                _SENTINEL_TS,
            ),
            key=len,
            reverse=True,
        )
    )
)


class _Stencil:
    """Storage rows serialised once with sentinel values; ``fill`` gives one run's rows by replacing
    the sentinels in every text column in one pass."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def fill(self, values: dict[str, str], **columns) -> list[dict]:
        def substitute(value):
            if not isinstance(value, str):
                return value
            return _SENTINEL_PATTERN.sub(lambda match: values[match.group(0)], value)

        return [{**{name: substitute(value) for name, value in row.items()}, **columns} for row in self.rows]


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
        return StreamCursor(
            in_flight={
                p: InFlight(start, end, self.newest_run_keys[p], self.last_timestamp, 1)
                for p, (start, end) in self.newest_ranges.items()
            }
        )


def materialization_metadata(batch: OffsetRange, rows: int, snapshot_id: int) -> dict:
    """The metadata ``binance_trades`` attaches to a NORMAL-level ingest materialisation."""
    return {
        "mode": "ingest",
        "degradation_level": "NORMAL",
        "enriched": True,
        "deferred_rows": 0,
        "spilled_rows": 0,
        "sequence_gaps": 0,
        "sequence_gaps_by_symbol": json.dumps({}),
        "topic": batch.topic,
        "partition": batch.partition,
        "start_offset": batch.start,
        "end_offset": batch.end,
        "rows_written": rows,
        "dead_lettered": 0,
        "already_committed": False,
        "snapshot_id": str(snapshot_id),
        "commit_seconds": 0.183,
    }


class RunHistoryWriter:
    """Appends micro-batch runs (and the ticks that requested them) to an instance, in batches."""

    def __init__(
        self,
        instance: DagsterInstance,
        defs: Definitions,
        topic: str,
        partitions: int,
        offsets_per_run: int = 5,
        tick_interval_s: float = 5.0,
    ) -> None:
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

    def _run(self, batch: OffsetRange, ts: float, run_id: str) -> tuple[DagsterRun, dict]:
        """The run the daemon creates for the sensor's request of ``batch``, finished, as its ``runs`` row."""
        run_key = f"{batch.key}#1"
        request = run_request(batch, run_key, 1)
        tags = {**self._job_tags, **request.tags, SENSOR_NAME_TAG: SENSOR_NAME, RUN_KEY_TAG: run_key}
        run = copy(
            self._template, run_id=run_id, run_config=request.run_config, tags=tags, status=DagsterRunStatus.SUCCESS
        )
        # The columns SqlRunStorage.add_run writes, then what the start and success events update.
        values = dict(
            run_id=run.run_id,
            pipeline_name=run.job_name,
            status=run.status.value,
            run_body=serialize_value(run),
            snapshot_id=run.job_snapshot_id,
            partition=None,
            partition_set=None,
            backfill_id=None,
            create_timestamp=_utc(ts),
            update_timestamp=_utc(ts + SUCCESS_OFFSET),
            start_time=ts + 1.0,
            end_time=ts + SUCCESS_OFFSET,
        )
        return run, values

    def _run_events(
        self, run: DagsterRun, batch: OffsetRange, ts: float, snapshot_id: int, data_version: str
    ) -> list[EventLogEntry]:
        def entry(event: DagsterEvent, at: float, step_key: str | None = None) -> EventLogEntry:
            return EventLogEntry(
                error_info=None,
                level=logging.DEBUG,
                user_message=event.message or "",
                run_id=run.run_id,
                timestamp=at,
                step_key=step_key,
                job_name=JOB_NAME,
                dagster_event=event,
            )

        events = [
            entry(DagsterEvent(event_type_value=kind.value, job_name=JOB_NAME, message=kind.value), ts + offset)
            for kind, offset in zip(RUN_STATUS_EVENTS, STATUS_EVENT_OFFSETS)
        ]
        events.append(
            entry(
                DagsterEvent(
                    event_type_value=DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value,
                    job_name=JOB_NAME,
                    event_specific_data=AssetMaterializationPlannedData(BINANCE_TRADES),
                    message=f"{JOB_NAME} intends to materialize asset binance_trades",
                ),
                ts + PLANNED_OFFSET,
            )
        )
        materialization = AssetMaterialization(
            asset_key=BINANCE_TRADES,
            metadata=materialization_metadata(batch, self.offsets_per_run, snapshot_id),
            tags={DATA_VERSION_TAG: data_version, CODE_VERSION_TAG: run.run_id},
        )
        events.append(
            entry(
                DagsterEvent(
                    event_type_value=DagsterEventType.ASSET_MATERIALIZATION.value,
                    job_name=JOB_NAME,
                    step_key=STEP_KEY,
                    event_specific_data=StepMaterializationData(materialization),
                    message="Materialized value binance_trades.",
                ),
                ts + MATERIALIZED_OFFSET,
                STEP_KEY,
            )
        )
        events.append(
            entry(
                DagsterEvent(
                    event_type_value=DagsterEventType.PIPELINE_SUCCESS.value,
                    job_name=JOB_NAME,
                    message=f'Finished execution of run for "{JOB_NAME}".',
                ),
                ts + SUCCESS_OFFSET,
            )
        )
        return events

    def _rows_of(
        self, batch: OffsetRange, ts: float, run_id: str, snapshot_id: int, data_version: str
    ) -> tuple[DagsterRun, dict, list[dict], list[EventLogEntry]]:
        """One run built and serialised the ordinary way: the run, its ``runs`` row, its tag rows
        (with ``run_id``), its events."""
        run, values = self._run(batch, ts, run_id)
        tags = [dict(run_id=run.run_id, key=k, value=v) for k, v in run.tags_for_storage().items()]
        return run, values, tags, self._run_events(run, batch, ts, snapshot_id, data_version)

    def _stencils(self) -> tuple[_Stencil, _Stencil, _Stencil, _Stencil]:
        """The ``runs`` row, run tag rows, event rows and the materialisation's asset-tag rows of a
        run with sentinel values, serialised once."""
        batch = OffsetRange(self.topic, _SENTINEL_PARTITION, _SENTINEL_START, _SENTINEL_END)
        _, values, tags, events = self._rows_of(
            batch, _SENTINEL_TS, _SENTINEL_RUN_ID, _SENTINEL_SNAPSHOT, _SENTINEL_DATA_VERSION
        )
        return (
            _Stencil([values]),
            _Stencil(tags),
            _Stencil([self._event_row(e) for e in events]),
            _Stencil(self._asset_tag_rows(events)),
        )

    def _asset_tag_rows(self, events: list[EventLogEntry]) -> list[dict]:
        """What ``_store_asset_event_tags`` inserts for the run's materialisation (without its event id)."""
        storage = self.instance.event_log_storage
        return [
            dict(
                asset_key=e.get_dagster_event().asset_key.to_string(),
                key=key,
                value=value,
                event_timestamp=_utc(e.timestamp),
            )
            for e in events
            if e.dagster_event_type == DagsterEventType.ASSET_MATERIALIZATION
            for key, value in storage._tags_for_asset_event(e).items()
        ]

    def _tick_checks(self, ts: float, lag: int) -> list[EventLogEntry]:
        """The check evaluations one sensor tick reports, made by the sensor's own rules."""
        ends = {p: self._ends[p] + lag for p in range(self.partitions)}
        snapshot = StreamOffsets(self.topic, ends, dict(self._ends))
        observation = Observation(offsets=snapshot, memory_percent=40.0, dead_letter_topic=f"{self.topic}.dlq")
        told = report(observation, decide(observation, StreamCursor(), self._settings, ts), self._settings)
        return [
            EventLogEntry(
                error_info=None,
                level=logging.DEBUG,
                user_message="",
                run_id=RUNLESS_RUN_ID,
                timestamp=ts,
                step_key=None,
                job_name=RUNLESS_JOB_NAME,
                dagster_event=DagsterEvent(
                    event_type_value=DagsterEventType.ASSET_CHECK_EVALUATION.value,
                    job_name=RUNLESS_JOB_NAME,
                    event_specific_data=check_evaluation(o),
                ),
            )
            for o in told.outcomes
        ]

    # -- many at once --------------------------------------------------------------------------

    def append(self, runs: int, batch_size: int = 500, now: float | None = None) -> RunHistory:
        """Append ``runs`` micro-batches (round robin over the partitions, one tick each), the newest
        ending about ``now``; returns what the history holds so far."""
        started = time.perf_counter()
        now = time.time() if now is None else now
        step = self.tick_interval_s / self.partitions
        first_ts = now - runs * step
        run_stencil, tag_stencil, event_stencil, asset_tag_stencil = self._stencils()
        # A tick's check evaluations depend on the lag, which is the same at every tick here, and
        # on the time: serialised once, and checked against the batch's last tick built anew.
        lag = self.offsets_per_run
        tick_checks = self._tick_checks(_SENTINEL_TS, lag)
        check_stencil = _Stencil([self._event_row(e) for e in tick_checks])
        for begin in range(0, runs, batch_size):
            runs_rows, tag_rows, event_rows, asset_tag_rows, check_rows = [], [], [], [], []
            last = min(runs, begin + batch_size) - 1
            last_tick = last - (self._written + last - begin) % self.partitions
            for index in range(begin, last + 1):
                ts = first_ts + index * step
                partition = self._written % self.partitions
                start = self._ends[partition]
                batch = OffsetRange(self.topic, partition, start, start + self.offsets_per_run)
                run_id, data_version = str(uuid.uuid4()), uuid.uuid4().hex
                snapshot_id = SNAPSHOT_ID_BASE + self._written
                values = _sentinel_values(run_id, batch, snapshot_id, data_version, ts)
                filled = (
                    run_stencil.fill(
                        values,
                        create_timestamp=_utc(ts),
                        start_time=ts + 1.0,
                        update_timestamp=_utc(ts + SUCCESS_OFFSET),
                        end_time=ts + SUCCESS_OFFSET,
                    ),
                    tag_stencil.fill(values),
                    [
                        dict(row, timestamp=_utc(ts + offset))
                        for row, offset in zip(event_stencil.fill(values), _EVENT_OFFSETS)
                    ],
                    asset_tag_stencil.fill(values, event_timestamp=_utc(ts + MATERIALIZED_OFFSET)),
                )
                if index == last:  # the batch's newest run, built the ordinary way: it must give the same rows
                    _, run_values, run_tags, latest_events = self._rows_of(batch, ts, run_id, snapshot_id, data_version)
                    _same_rows("runs", filled[0], [run_values])
                    _same_rows("run_tags", filled[1], run_tags)
                    _same_rows("event_logs", filled[2], [self._event_row(e) for e in latest_events])
                    _same_rows("asset_event_tags", filled[3], self._asset_tag_rows(latest_events))
                runs_rows += filled[0]
                tag_rows += filled[1]
                event_rows += filled[2]
                asset_tag_rows.append(filled[3])
                if partition == 0:  # a tick requests one batch per partition: one tick's checks per round
                    tick_ts = ts - 0.5
                    filled_checks = [
                        dict(row, timestamp=_utc(tick_ts))
                        for row in check_stencil.fill({repr(_SENTINEL_TS): repr(tick_ts)})
                    ]
                    if index == last_tick:
                        _same_rows(
                            "event_logs (checks)",
                            filled_checks,
                            [self._event_row(e) for e in self._tick_checks(tick_ts, lag)],
                        )
                    check_rows += filled_checks
                self._ends[partition] = batch.end
                self._newest[partition] = (f"{batch.key}#1", batch.start, batch.end)
                self._written += 1
                self._first_ts = ts if self._first_ts is None else self._first_ts
                self._last_ts = ts
            self._insert_runs(runs_rows, tag_rows)
            self._insert_events(event_rows, asset_tag_rows, latest_events, check_rows, tick_checks)
            self._checks += len(check_rows)
        return RunHistory(
            topic=self.topic,
            runs=self._written,
            check_evaluations=self._checks,
            seconds=time.perf_counter() - started,
            ends=dict(self._ends),
            newest_run_keys={p: key for p, (key, _, _) in self._newest.items()},
            newest_ranges={p: (s, e) for p, (_, s, e) in self._newest.items()},
            first_timestamp=self._first_ts or now,
            last_timestamp=self._last_ts,
        )

    def _insert_runs(self, runs_rows: list[dict], tag_rows: list[dict]) -> None:
        """What ``add_run`` and the run's status events write in run storage, for many runs in one transaction."""
        with self.instance.run_storage.connect() as conn:
            conn.execute(RunsTable.insert(), runs_rows)
            conn.execute(RunTagsTable.insert(), tag_rows)

    def _insert_events(
        self,
        run_event_rows: list[dict],
        asset_tag_rows: list[list[dict]],
        latest_events: list[EventLogEntry],
        check_rows: list[dict],
        tick_checks: list[EventLogEntry],
    ) -> None:
        """What ``store_event`` puts in the index shard (and the runless shard), one transaction each.

        Rows are the storage's own (``_event_to_row``, or the stencil's copies of it); storage ids
        are given in order from the index's current maximum (nothing else writes while this runs).
        ``asset_tag_rows``: per run, its materialisation's tag rows; ``latest_events``: the newest
        run's events, whose planned and materialisation events become the asset's latest;
        ``check_rows``: the ticks' check evaluations, each tick's in the order of ``tick_checks``."""
        storage = self.instance.event_log_storage
        with storage.run_connection(RUNLESS_RUN_ID) as conn:  # report_runless_asset_event's own shard
            conn.execute(SqlEventLogStorageTable.insert(), check_rows)
        with storage.index_transaction() as conn:
            next_id = (conn.execute(db.select(db.func.max(SqlEventLogStorageTable.c.id))).scalar() or 0) + 1
            rows = [dict(row) for row in run_event_rows] + [dict(row) for row in check_rows]
            for offset, row in enumerate(rows):
                row["id"] = next_id + offset
            conn.execute(SqlEventLogStorageTable.insert(), rows)
            ids = [row["id"] for row in rows]
            run_ids, check_ids = ids[: len(run_event_rows)], ids[len(run_event_rows) :]
            materialized = [
                i
                for row, i in zip(run_event_rows, run_ids)
                if row["dagster_event_type"] == DagsterEventType.ASSET_MATERIALIZATION.value
            ]
            planned = [
                i
                for row, i in zip(run_event_rows, run_ids)
                if row["dagster_event_type"] == DagsterEventType.ASSET_MATERIALIZATION_PLANNED.value
            ]
            assert len(materialized) == len(asset_tag_rows)
            tag_rows = [
                dict(row, event_id=event_id)
                for event_id, rows_of_run in zip(materialized, asset_tag_rows)
                for row in rows_of_run
            ]
            if tag_rows and storage.has_table(AssetEventTagsTable.name):
                conn.execute(AssetEventTagsTable.insert(), tag_rows)
            latest = {e.dagster_event_type: e for e in latest_events}
            # The asset's latest, as the last store_event leaves it.
            storage._store_asset_event(conn, latest[DagsterEventType.ASSET_MATERIALIZATION_PLANNED], planned[-1])
            storage._store_asset_event(conn, latest[DagsterEventType.ASSET_MATERIALIZATION], materialized[-1])
            conn.execute(
                AssetCheckExecutionsTable.insert(),
                [
                    self._check_row(tick_checks[n % len(tick_checks)], row, i)
                    for n, (row, i) in enumerate(zip(check_rows, check_ids))
                ],
            )

    def _event_row(self, event: EventLogEntry) -> dict:
        return self.instance.event_log_storage._event_to_row(event)

    @staticmethod
    def _check_row(event: EventLogEntry, row: dict, event_id: int) -> dict:
        """The row ``_store_runless_asset_check_evaluation`` inserts for one evaluation (``event``: the
        evaluation, or its stencil's; ``row``: its event-log row)."""
        evaluation = event.get_dagster_event().event_specific_data
        return dict(
            asset_key=evaluation.asset_key.to_string(),
            check_name=evaluation.check_name,
            run_id=event.run_id,
            execution_status=(
                AssetCheckExecutionRecordStatus.SUCCEEDED.value
                if evaluation.passed
                else AssetCheckExecutionRecordStatus.FAILED.value
            ),
            evaluation_event=row["event"],
            evaluation_event_timestamp=row["timestamp"],
            evaluation_event_storage_id=event_id,
            materialization_event_storage_id=None,
            partition=None,
        )


def _same_rows(table: str, filled: list[dict], built: list[dict]) -> None:
    """The stencil's rows for a run equal the rows built and serialised the ordinary way."""
    if filled != built:
        raise AssertionError(
            f"run_history's stencil for {table} no longer matches serialize_value (a Dagster "
            f"upgrade or a change in the sensor's rules changed what is stored?): "
            f"{filled!r} != {built!r}"
        )


def _utc(ts: float) -> datetime:
    """A naive UTC datetime, as Dagster's SQL storages store timestamps."""
    return datetime.fromtimestamp(ts, UTC).replace(tzinfo=None)
