"""K2 on the object store, Iceberg REST catalog and Postgres of `k2 cluster` (issue 11).

Real services, started once per session (tests/conftest.py): SeaweedFS serving S3 and an Iceberg
REST catalog, and Debian's PostgreSQL holding a Dagster instance. K2 finds them through
environment variables only, as it would find a real cluster's.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from dagster import DagsterInstance, materialize
from pyiceberg.table.update import AddSnapshotUpdate

from k2_assets.asx import asx_raw_trades, asx_trades
from k2_resources.asx.source import AsxSourceResource
from k2_resources.catalog.errors import CatalogUnavailableError, explaining_catalog_errors
from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.operations.dagster_instance import POSTGRES_INSTANCE_CONFIG, prepare_instance
from k2_resources.query.duckdb_query import DuckDBQueryResource
from k2_resources.query.sql_query import run_sql
from k2_resources.sink.offset_commit import commit_range
from k2_resources.sink.offsets import OffsetRange, committed_offsets
from k2_resources.trades.hybrid import HybridQueryResource
from tests.support.cluster_services import drop_k2_tables, rest_catalog, s3_objects
from tests.support.synthetic import asx_trades as synthetic_asx_trades

pytestmark = pytest.mark.integration

FLAT_COLUMNS = [
    "message_id",
    "trade_id",
    "symbol",
    "exchange",
    "asset_class",
    "timestamp",
    "price",
    "quantity",
    "currency",
    "side",
    "source_sequence",
    "ingestion_timestamp",
    "platform_sequence",
]


def _use(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _sorted(rows: pa.Table) -> pa.Table:
    return rows.select(FLAT_COLUMNS).sort_by([(name, "ascending") for name in FLAT_COLUMNS])


@pytest.mark.timeout(180)
def test_asx_trades_written_through_the_rest_catalog_land_in_s3_and_read_back_equal(k2_home, object_store, monkeypatch):
    _use(monkeypatch, object_store.env())
    drop_k2_tables(rest_catalog(object_store))
    iceberg = IcebergResource()  # nothing configured: the environment names the catalog and the store
    assert iceberg.catalog().properties["uri"] == object_store.env()["K2_ICEBERG_CATALOG_URI"]

    rows = synthetic_asx_trades(1)
    iceberg.trades().append(rows, snapshot_properties={"k2.test.source": "asx_trades(1)"})

    table = iceberg.trades()
    assert table.metadata_location.startswith("s3://k2lake/")
    assert table.current_snapshot().summary["k2.test.source"] == "asx_trades(1)"
    back = table.scan().to_arrow()
    assert back.num_rows == rows.num_rows == 200_545
    assert _sorted(back).equals(_sorted(rows))

    # Every data file of the table is an object in the bucket, of the size the manifest records.
    files = {task.file.file_path: task.file.file_size_in_bytes for task in table.scan().plan_files()}
    objects = s3_objects(object_store, "market/trades/")
    assert files and {path: objects.get(path) for path in files} == files
    assert table.metadata_location in objects

    # K2's own readers (the hybrid resource; ASX has no Kafka topic, so Iceberg alone answers): the
    # default polars path reads the S3 files with the catalog's endpoint and keys, pyiceberg's too.
    start, end = datetime(2014, 3, 11, tzinfo=UTC), datetime(2014, 3, 12, tzinfo=UTC)
    in_window = pc.and_(
        pc.and_(pc.equal(rows["symbol"], "BHP"), pc.greater_equal(rows["timestamp"], pa.scalar(start))),
        pc.less(rows["timestamp"], pa.scalar(end)),
    )
    expected = _sorted(rows.filter(in_window))
    assert expected.num_rows > 0
    for read_path in ("polars", "pyiceberg", "planned", "duckdb"):
        bhp = HybridQueryResource(iceberg=iceberg, read_path=read_path).trades_arrow(
            ["BHP"], start, end, exchange="ASX"
        )
        assert _sorted(bhp).equals(expected), read_path
    # SQL (`k2 query sql`) reads the S3 files through DuckDB's httpfs with the store's keys.
    columns, answer = run_sql(
        "select count(*), count(distinct message_id) from market.trades where symbol = ?", ["BHP"]
    )
    bhp_rows = pc.sum(pc.equal(rows["symbol"], "BHP")).as_py()
    assert answer == [(bhp_rows, bhp_rows)]


def _stop_at_the_catalog_commit(monkeypatch: pytest.MonkeyPatch, iceberg: IcebergResource, store) -> None:
    """Stop the store the moment the commit of a snapshot is sent: its data files are in S3 already."""
    catalog = iceberg.catalog()
    commit_table = catalog.commit_table

    def stop_then_commit(table, requirements, updates):
        if any(isinstance(update, AddSnapshotUpdate) for update in updates):
            store.stop()
        return commit_table(table, requirements, updates)

    monkeypatch.setattr(catalog, "commit_table", stop_then_commit)


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "moment, named", [("before the data files", "K2_S3_ENDPOINT"), ("at the catalog commit", "K2_ICEBERG_CATALOG_URI")]
)
def test_store_stopped_during_a_commit_is_named_and_the_retry_commits_exactly_once(
    k2_home, object_store, monkeypatch, moment, named
):
    _use(monkeypatch, object_store.env())
    drop_k2_tables(rest_catalog(object_store))
    iceberg = IcebergResource()
    rows = synthetic_asx_trades(1).slice(0, 5_000)
    batch = OffsetRange("market.trades.cluster-test", 0, 0, rows.num_rows)
    before_commit = object_store.stop if moment == "before the data files" else None
    if before_commit is None:
        _stop_at_the_catalog_commit(monkeypatch, iceberg, object_store)

    with pytest.raises(CatalogUnavailableError) as down:
        with explaining_catalog_errors():  # as the micro-batch asset runs commit_range
            commit_range(iceberg, batch, rows, before_commit=before_commit)
    message = str(down.value)
    assert f"{object_store.env()[named]} ({named})" in message
    assert "k2 cluster start" in message and "nothing was committed" in message

    object_store.start()
    table = IcebergResource().trades()
    assert table.scan().to_arrow().num_rows == 0 and committed_offsets(table, batch.topic) == {}

    first = commit_range(IcebergResource(), batch, rows)
    again = commit_range(IcebergResource(), batch, rows)
    table = IcebergResource().trades()
    assert (first.written, first.already_committed, again.written, again.already_committed) == (5_000, False, 0, True)
    assert table.scan().to_arrow().num_rows == 5_000
    assert committed_offsets(table, batch.topic) == {0: 5_000}
    assert pc.count_distinct(table.scan().to_arrow()["message_id"]).as_py() == 5_000


def _asx_day(instance: DagsterInstance, day: str) -> None:
    iceberg = IcebergResource()  # the embedded SQLite catalog of this test's K2_HOME
    result = materialize(
        [asx_raw_trades, asx_trades],
        partition_key=day,
        instance=instance,
        resources={
            "asx_source": AsxSourceResource(),
            "iceberg": iceberg,
            "duckdb": DuckDBQueryResource(iceberg=iceberg),
        },
    )
    assert result.success


@pytest.mark.timeout(240)
def test_dagster_instance_on_postgres_runs_assets_names_an_outage_and_recovers(k2_home, postgres_server, monkeypatch):
    _use(monkeypatch, postgres_server.env())
    home = k2_home / "dagster"
    prepare_instance(home, POSTGRES_INSTANCE_CONFIG)  # `k2 instance migrate` on Postgres
    assert "postgres" in (home / "dagster.yaml").read_text()

    with DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs_before = instance.get_runs_count()  # the server is shared by the session
        _asx_day(instance, "2014-03-13")
        assert instance.get_runs_count() == runs_before + 1

        # A 20 s outage: every attempt to open the instance meanwhile fails with one clear error.
        postgres_server.stop()
        down_at, attempts = time.monotonic(), 0
        while time.monotonic() - down_at < 20:
            with pytest.raises(K2Error) as down:
                prepare_instance(home, config=None)
            message = str(down.value)
            assert f"127.0.0.1:{postgres_server.port()}" in message and "does not answer" in message
            assert "k2 cluster start" in message and "DAGSTER_POSTGRES_HOST" in message
            attempts += 1
            time.sleep(2)
        assert attempts >= 5
        postgres_server.start()

        prepare_instance(home, config=None)
        # The instance opened before the outage works again: another run is recorded beside the first.
        _asx_day(instance, "2014-03-14")
        assert instance.get_runs_count() == runs_before + 2
        assert all(run.is_success for run in instance.get_runs(limit=2))


def test_postgres_instance_file_names_every_setting_by_environment(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("DAGSTER_POSTGRES_HOST", raising=False)
    with pytest.raises(K2Error, match="DAGSTER_POSTGRES_HOST"):
        prepare_instance(tmp_path / "dagster", POSTGRES_INSTANCE_CONFIG)
