"""The stream sensor over a long run history: 2,000 micro-batch runs in the SQLite Dagster instance.

Timing says little on a shared machine, so this counts work instead: SQLite's virtual-machine
steps (a progress handler on every SQLite connection the tick opens: Dagster's run and event
storages and the Iceberg catalog) for the same tick with one round of runs in the instance and
with 2,000. A tick whose queries scan runs, materialisations or check evaluations does about 700
times more steps at 2,000 runs; a tick of indexed, limited look-ups does about the same (4,100
and 4,300 steps here). The
sensor must also still decide right among thousands of runs with look-alike run keys.
"""

from __future__ import annotations

import json
import time

import pytest
import sqlalchemy as sa
from dagster import AssetCheckKey, DagsterInstance, RunsFilter
from dagster._core.storage.event_log.schema import SqlEventLogStorageTable
from dagster._core.storage.tags import RUN_KEY_TAG
from sqlalchemy import event
from sqlalchemy.pool import Pool

from k2_assets.operations.history_retention import dagster_history_retention
from k2_resources.catalog.resource import IcebergResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.operations.dagster_instance import prepare_instance
from k2_resources.operations.history_retention import RetentionPolicy, prune_stream_history, stream_check_keys
from k2_resources.paths import dagster_home
from k2_resources.sink.offsets import committed_key
from k2_sensors.binance.driver import checks_of, tick
from k2_sensors.binance.observe import BINANCE_TRADES, latest_batch_gaps
from tests.support.run_history import RunHistoryWriter
from tests.support.stream import stream_defs

pytestmark = pytest.mark.integration

PARTITIONS = 3
OFFSETS_PER_RUN = 5
RUNS = 2_000
LAG = 20
STEP_GRANULARITY = 100  # the progress handler is called every this many SQLite VM steps


class SqliteSteps:
    """Counts SQLite VM steps on every SQLAlchemy-pooled sqlite3 connection opened while active."""

    def __init__(self) -> None:
        self.calls = 0
        self.active = False

    def _progress(self) -> int:
        if self.active:
            self.calls += 1
        return 0  # 0: let the statement go on

    def on_connect(self, dbapi_connection, _record) -> None:
        if hasattr(dbapi_connection, "set_progress_handler"):
            dbapi_connection.set_progress_handler(self._progress, STEP_GRANULARITY)

    def measure(self, action) -> tuple[int, object]:
        self.calls, self.active = 0, True
        try:
            result = action()
        finally:
            self.active = False
        return self.calls * STEP_GRANULARITY, result


@pytest.fixture
def sqlite_steps():
    steps = SqliteSteps()
    event.listen(Pool, "connect", steps.on_connect)
    yield steps
    event.remove(Pool, "connect", steps.on_connect)


def _fill_topic(kafka: KafkaResource, topic: str, per_partition: int) -> None:
    producer = kafka.producer()
    for _ in range(per_partition):
        for partition in range(PARTITIONS):
            producer.send(topic, value=b"k2-scale", partition=partition)
    producer.flush()
    producer.close()


def _commit(iceberg: IcebergResource, topic: str, ends: dict[int, int]) -> None:
    with iceberg.trades().transaction() as transaction:
        transaction.set_properties({committed_key(topic): json.dumps({str(p): o for p, o in sorted(ends.items())})})


def _ranges(result) -> dict[int, tuple[int, int, str]]:
    ranges = {}
    for request in result.run_requests:
        config = request.run_config["ops"]["binance_trades"]["config"]
        ranges[config["partition"]] = (config["start_offset"], config["end_offset"], request.run_key)
    return ranges


@pytest.mark.timeout(900)
def test_a_tick_does_the_same_work_with_2000_runs_and_still_decides_right(
    k2_home, kafka_broker, topic_name, sqlite_steps
):
    home = dagster_home()
    prepare_instance(home)
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS)
    _fill_topic(kafka, topic_name, (RUNS + PARTITIONS - 1) // PARTITIONS * OFFSETS_PER_RUN + LAG)
    defs = stream_defs(topic_name, max_batch=OFFSETS_PER_RUN)

    with DagsterInstance.from_config(str(home)) as instance:
        writer = RunHistoryWriter(instance, defs, topic_name, PARTITIONS, offsets_per_run=OFFSETS_PER_RUN)

        def steps_of_a_tick(history) -> tuple[int, object]:
            _commit(iceberg, topic_name, history.ends)
            cursor = history.cursor().to_json()
            tick(instance, defs, cursor)  # warm-up: the table's metadata, the first connections
            return sqlite_steps.measure(lambda: tick(instance, defs, cursor))

        first = writer.append(PARTITIONS)
        base_steps, base_result = steps_of_a_tick(first)
        history = writer.append(RUNS - PARTITIONS)
        soak_steps, soak_result = steps_of_a_tick(history)

        # The history is there, as the public API reads it.
        assert instance.get_runs_count() == RUNS
        newest = instance.fetch_materializations(BINANCE_TRADES, limit=1).records[0].asset_materialization
        assert newest.metadata["end_offset"].value == max(history.ends.values())
        checks_per_tick = len(base_result.asset_events)  # what the real sensor reports each tick
        assert checks_per_tick >= 7
        assert history.check_evaluations == checks_per_tick * (RUNS // PARTITIONS + (RUNS % PARTITIONS > 0))

        # Same decision shape at both sizes: every in-flight run succeeded, so the next range of each partition.
        for history_now, result in ((first, base_result), (history, soak_result)):
            assert {p: r[:2] for p, r in _ranges(result).items()} == {
                p: (end, end + OFFSETS_PER_RUN) for p, end in history_now.ends.items()
            }
            assert all(key.endswith("#1") for _, _, key in _ranges(result).values())

        # Bounded: 2,000 runs cost at most a little more than 3. The counter does see Dagster's
        # queries: reading the history once (every run and materialisation) costs several ticks.
        scan_steps, _ = sqlite_steps.measure(
            lambda: (
                instance.fetch_materializations(BINANCE_TRADES, limit=RUNS),
                instance.get_runs(filters=RunsFilter(job_name="binance_trades_microbatch")),
            )
        )
        assert base_steps > 0 and scan_steps > 3 * soak_steps, (base_steps, soak_steps, scan_steps)
        assert soak_steps <= 1.5 * base_steps + 2_000, (base_steps, soak_steps)

        # Among 2,000 runs, the sensor still finds the newest run of partition 1 failed and asks again.
        failed_key = history.newest_run_keys[1]
        failed_run = instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: failed_key}))[0]
        instance.report_run_failed(failed_run)
        start, end = history.newest_ranges[1]
        committed = {**history.ends, 1: start}
        _commit(iceberg, topic_name, committed)  # the failed run committed nothing
        result = tick(instance, defs, history.cursor().to_json())
        ranges = _ranges(result)
        assert ranges[1] == (start, end, f"{topic_name}-1-{start}-{end}#2")
        assert ranges[0][:2] == (history.ends[0], history.ends[0] + OFFSETS_PER_RUN)
        assert ranges[2][:2] == (history.ends[2], history.ends[2] + OFFSETS_PER_RUN)
        assert not instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: ranges[1][2]}))  # a fresh key
        checks = checks_of(result)
        topic_ends = kafka.end_offsets(topic_name)
        assert checks["consumer_lag"]["metadata"]["lag_messages"] == sum(
            topic_ends[p] - committed[p] for p in topic_ends
        )
        print(
            json.dumps(
                {
                    "runs": RUNS,
                    "tick_sqlite_steps_base": base_steps,
                    "tick_sqlite_steps_2000": soak_steps,
                    "all_materialisations_sqlite_steps": scan_steps,
                }
            )
        )


@pytest.mark.timeout(900)
def test_retention_keeps_what_the_sensor_checks_and_exporter_read_and_bounds_the_check_history(
    k2_home, kafka_broker, topic_name, sqlite_steps
):
    """Old runs and old sensor check evaluations go; the newest of each, the in-flight runs and what the
    sensor decides from stay, and reading a check's latest evaluation does less work afterwards."""
    home = dagster_home()
    prepare_instance(home)
    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=PARTITIONS)
    old_runs, recent_runs = 90, 30
    _fill_topic(kafka, topic_name, (old_runs + recent_runs) // PARTITIONS * OFFSETS_PER_RUN + LAG)
    defs = stream_defs(topic_name, max_batch=OFFSETS_PER_RUN)
    now = time.time()
    policy = RetentionPolicy(
        run_retention_hours=24, min_runs_to_keep=60, check_retention_hours=24, min_evaluations_to_keep=20
    )

    with DagsterInstance.from_config(str(home)) as instance:
        writer = RunHistoryWriter(instance, defs, topic_name, PARTITIONS, offsets_per_run=OFFSETS_PER_RUN)
        writer.append(old_runs, now=now - 3 * 86_400)  # three days old
        history = writer.append(recent_runs, now=now)
        _commit(iceberg, topic_name, history.ends)
        check_keys = [
            AssetCheckKey(BINANCE_TRADES, name)
            for name in sorted(checks_of(tick(instance, defs, history.cursor().to_json())))
        ]
        storage = instance.event_log_storage
        latest_before = storage.get_latest_asset_check_execution_by_key(check_keys)
        steps_before, _ = sqlite_steps.measure(lambda: storage.get_latest_asset_check_execution_by_key(check_keys))
        evaluations_before = {
            k.name: len(storage.get_asset_check_execution_history(k, limit=10_000)) for k in check_keys
        }

        report = prune_stream_history(instance, "binance_trades_microbatch", check_keys, policy)

        # Runs: the newest 60 stay (all 30 recent ones and the 30 newest old ones), in-flight ones among them.
        assert report.runs_deleted == old_runs + recent_runs - 60
        assert instance.get_runs_count() == 60
        for key in history.newest_run_keys.values():
            assert instance.get_runs(filters=RunsFilter(tags={RUN_KEY_TAG: key}))
        assert len(instance.fetch_materializations(BINANCE_TRADES, limit=10_000).records) == 60
        # Checks: the newest 20 evaluations of each stay (the recent ticks alone are 10 per check),
        # the latest unchanged.
        for key in check_keys:
            kept = storage.get_asset_check_execution_history(key, limit=10_000)
            assert len(kept) == 20 and report.evaluations_deleted[key.name] == evaluations_before[key.name] - 20
        assert {k: r.id for k, r in storage.get_latest_asset_check_execution_by_key(check_keys).items()} == {
            k: r.id for k, r in latest_before.items()
        }
        with storage.run_connection("") as conn:  # the SQLite storage's own copy of runless events
            shard = conn.execute(
                sa.select(sa.func.count())
                .select_from(SqlEventLogStorageTable)
                .where(SqlEventLogStorageTable.c.dagster_event_type == "ASSET_CHECK_EVALUATION")
            ).scalar()
        assert shard == 20 * len(check_keys)
        steps_after, _ = sqlite_steps.measure(lambda: storage.get_latest_asset_check_execution_by_key(check_keys))
        assert steps_after < steps_before, (steps_before, steps_after)
        # The sensor decides as before: the newest run of each partition found, the next range requested.
        result = tick(instance, defs, history.cursor().to_json())
        assert {p: r[:2] for p, r in _ranges(result).items()} == {
            p: (end, end + OFFSETS_PER_RUN) for p, end in history.ends.items()
        }
        assert set(latest_batch_gaps(instance, topic_name)) == set(range(PARTITIONS))
        # The nightly job, with the same policy, finds nothing more to delete.
        config = {
            "run_retention_hours": 24,
            "min_runs_to_keep": 60,
            "check_retention_hours": 24,
            "min_evaluations_to_keep": 20,
        }
        outcome = dagster_history_retention.execute_in_process(
            instance=instance, run_config={"ops": {"prune_dagster_history": {"config": config}}}
        )
        assert outcome.success
        assert instance.get_runs_count() == 60 + 1  # the retention run itself
        assert stream_check_keys(instance, BINANCE_TRADES) == check_keys
        assert all(len(storage.get_asset_check_execution_history(k, limit=10_000)) == 20 for k in check_keys)
