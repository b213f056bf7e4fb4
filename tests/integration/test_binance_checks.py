"""The @asset_check functions of k2_assets/binance/checks.py, run as Dagster runs them (a job of the
checks, real Kafka and Iceberg), through failing and passing states; and the Iceberg read paths
of the hybrid query returning the same rows."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pytest
from dagster import AssetSelection, DagsterInstance, Definitions, define_asset_job, materialize

from k2_assets.binance import defs as binance_defs
from k2_assets.binance.assets import binance_trades
from k2_assets.resources import build_resources
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.sink.resource import TradeSinkResource
from k2_resources.trades.iceberg_read import RowFilter, SnapshotReader
from tests.support.producing import produce
from tests.support.recorded import first_binance_records
from tests.support.synthetic import asx_trades

pytestmark = pytest.mark.integration

CHECKS = {
    "consumer_lag",
    "offset_baseline",
    "degradation_level",
    "deferred_backlog",
    "spilled_backlog",
    "sequence_gaps",
    "dead_letter_count",
}


def _resources(topic: str, spill_dir: str) -> dict:
    resources = build_resources()
    resources.update(
        sink=TradeSinkResource(topic=topic, lag_warn_messages=100, lag_error_messages=1_000),
        degradation=DegradationResource(
            lag_triggers=[50, 150, 1_000, 2_000],
            spill_dir=spill_dir,
            memory_triggers_percent=[101.0, 102.0, 103.0, 104.0],
        ),  # lag only
    )
    return resources


def _run_checks(instance: DagsterInstance, defs: Definitions) -> dict[str, dict]:
    """Execute every check of binance_trades in one run; check name -> {passed, severity, metadata}."""
    result = defs.resolve_job_def("binance_checks").execute_in_process(instance=instance)
    assert result.success
    return {
        e.check_name: {
            "passed": e.passed,
            "severity": e.severity.value,
            "metadata": {k: getattr(v, "value", v) for k, v in e.metadata.items()},
        }
        for e in result.get_asset_check_evaluations()
    }


def _materialize(
    instance: DagsterInstance, resources: dict, topic: str, start: int, end: int, level: int = 0, mode: str = "ingest"
) -> dict:
    config = {
        "topic": topic,
        "partition": 0,
        "start_offset": start,
        "end_offset": end,
        "degradation_level": level,
        "mode": mode,
    }
    result = materialize(
        [binance_trades],
        instance=instance,
        resources=resources,
        run_config={"ops": {"binance_trades": {"config": config}}},
    )
    assert result.success
    return {
        k: getattr(v, "value", v)
        for k, v in result.asset_materializations_for_node("binance_trades")[0].metadata.items()
    }


def test_the_binance_checks_fail_and_pass_with_the_state_of_kafka_and_iceberg(k2_home, kafka_broker, topic_name):
    kafka = KafkaResource()
    kafka.ensure_topic(topic_name, partitions=1)
    trades = first_binance_records("BTCUSDT", 500)
    first, rest = trades[:100] + trades[105:300], trades[300:]  # trade ids 100-104 never arrive
    produce(kafka, topic_name, first, partitions=1)
    producer = kafka.producer()
    producer.send(topic_name, value=b"not a trade V2 record", partition=0)  # offset 295: a dead letter
    producer.flush()
    producer.close()
    produce(kafka, topic_name, rest, partitions=1)  # offsets 296-495
    resources = _resources(topic_name, str(k2_home / "spill"))
    defs = Definitions.merge(
        binance_defs,
        Definitions(
            resources=resources,
            jobs=[define_asset_job("binance_checks", selection=AssetSelection.checks_for_assets(binance_trades))],
        ),
    )

    with DagsterInstance.ephemeral() as instance:
        batch = _materialize(instance, resources, topic_name, 0, 296)
        assert (batch["rows_written"], batch["dead_lettered"], batch["sequence_gaps"]) == (295, 1, 5)
        checks = _run_checks(instance, defs)
        assert set(checks) >= CHECKS  # each check of checks.py ran (and any added since)
        assert {name for name, check in checks.items() if not check["passed"]} == {
            "consumer_lag",
            "degradation_level",
            "sequence_gaps",
            "dead_letter_count",
        }
        assert (
            checks["consumer_lag"]["severity"] == "WARN" and checks["consumer_lag"]["metadata"]["lag_messages"] == 200
        )
        assert checks["degradation_level"]["metadata"]["level"] == "GRACEFUL"  # lag 200 >= 150
        gaps = checks["sequence_gaps"]["metadata"]
        assert gaps["missing_trade_ids"] == 5 and gaps["by_symbol"] == '{"BTCUSDT": 5}'
        assert checks["dead_letter_count"]["metadata"]["dead_letters"] == 1
        assert checks["dead_letter_count"]["metadata"]["dead_letter_topic"] == f"{topic_name}.dlq"

        # The rest at AGGRESSIVE: spilled, so the lag is gone but the spilled backlog fails.
        spilled = _materialize(instance, resources, topic_name, 296, 496, level=3)
        assert spilled["spilled_rows"] == 200
        checks = _run_checks(instance, defs)
        assert {name for name, check in checks.items() if not check["passed"]} == {
            "spilled_backlog",
            "dead_letter_count",
        }
        assert checks["spilled_backlog"]["metadata"]["rows"] == 200
        assert checks["spilled_backlog"]["metadata"]["spill_files"] == 1
        assert checks["sequence_gaps"]["metadata"]["missing_trade_ids"] == 0  # the newest batch has no gap

        recovered = _materialize(instance, resources, topic_name, 296, 496, mode="recover")
        assert recovered["rows_written"] == 200
        checks = _run_checks(instance, defs)
        assert {name for name, check in checks.items() if not check["passed"]} == {"dead_letter_count"}
    assert IcebergResource().trades().scan().to_arrow().num_rows == 495


def test_every_iceberg_read_path_returns_the_same_rows_as_the_default(k2_home):
    table = IcebergResource().trades()
    table.append(asx_trades(scale=1))
    table.append(asx_trades(scale=1, seed=8).slice(0, 20_000))  # a second snapshot, more files
    snapshot_id = table.current_snapshot().snapshot_id
    day = datetime(2014, 3, 11, tzinfo=timezone(timedelta(hours=11)))
    filters = [
        RowFilter(symbols=("BHP",)),
        RowFilter(start=day + timedelta(hours=10), end=day + timedelta(hours=11), exchange="ASX"),
        RowFilter(symbols=("BHP", "RIO", "CBA"), start=day, end=day + timedelta(days=1)),
        RowFilter(symbols=("NOSUCH",)),
    ]
    readers = {path: SnapshotReader(read_path=path) for path in ("polars", "planned", "duckdb", "pyiceberg")}
    try:
        for row_filter in filters:
            expected = _sorted(readers["polars"].read(table, snapshot_id, row_filter))  # the default path
            assert expected.num_rows > 1000 or row_filter.symbols == ("NOSUCH",)
            for path, reader in readers.items():
                got = _sorted(reader.read(table, snapshot_id, row_filter))
                assert got.schema == expected.schema, path
                assert got.num_rows == expected.num_rows, (path, row_filter)
                assert got.equals(expected), f"{path} differs from polars for {row_filter}"
    finally:
        for reader in readers.values():
            reader.close()


def _sorted(rows: pa.Table) -> pa.Table:
    # Every column is a sort key: the two synthetic snapshots share message ids, so sorting on
    # message_id alone leaves ties whose order differs between read paths.
    keys = [field.name for field in rows.schema if not pa.types.is_nested(field.type)]
    return rows.sort_by([(name, "ascending") for name in keys])
