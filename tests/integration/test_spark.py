"""Spark reads K2's tables and computes for K2: one real local[2] Spark session per pytest run
(tests/support/spark.py) over K2's embedded catalog (Iceberg's JdbcCatalog on pyiceberg's SQLite
database) and over the REST catalog + S3 of `k2 cluster` (SeaweedFS)."""

from __future__ import annotations

from datetime import UTC, datetime

import polars as pl
import pyarrow as pa
import pytest
from dagster import DagsterInstance, materialize

from k2_assets.analytics import asx_ohlcv, binance_ohlcv
from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.analytics.ohlcv import exchange_day_bounds, ohlcv_bars, ohlcv_table, read_trades, stored_bars
from k2_resources.analytics.spark_session import spark_session
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import OHLCV
from k2_resources.query.duckdb_query import DuckDBQueryResource
from k2_resources.trades.iceberg_read import RowFilter
from tests.support.cluster_services import drop_k2_tables, rest_catalog
from tests.support.synthetic import append_in_chunks, asx_trades, binance_trades, to_trades_arrow

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

ASX_DAY = "2014-03-11"
BINANCE_END = datetime(2024, 8, 9, 0, 0, 30, tzinfo=UTC)  # ~1 min of trades across a UTC midnight
BINANCE_DAYS = (datetime(2024, 8, 8, tzinfo=UTC), datetime(2024, 8, 10, tzinfo=UTC))
PER_SYMBOL_SQL = (
    "SELECT symbol, exchange, count(*) AS trades, sum(quantity) AS volume, min(timestamp) AS first_at, "
    "max(timestamp) AS last_at FROM {table} GROUP BY symbol, exchange ORDER BY symbol, exchange"
)
BAR_KEY = ["interval", "symbol", "exchange", "bucket_start"]


def _written_per_symbol(trades: pa.Table) -> list[dict]:
    """The per-symbol answer computed from the rows as written (independent of any reader)."""
    return (
        pl.from_arrow(trades)
        .group_by("symbol", "exchange")
        .agg(
            pl.len().alias("trades"),
            pl.col("quantity").sum().alias("volume"),
            pl.col("timestamp").min().alias("first_at"),
            pl.col("timestamp").max().alias("last_at"),
        )
        .sort("symbol", "exchange")
        .to_dicts()
    )


def _rows(table: pa.Table) -> list[dict]:
    return [{**row, "trades": int(row["trades"])} for row in table.to_pylist()]


@pytest.fixture(scope="module")
def lake_trades(spark_lake) -> pa.Table:
    """One real ASX trading day and 3,000 synthetic Binance trades, written into the Spark lake by K2
    (pyiceberg appends: the ASX day in one commit, Binance in three)."""
    start, end = exchange_day_bounds("ASX", ASX_DAY)
    every_day = asx_trades(scale=1)
    in_day = pl.from_arrow(every_day.select(["timestamp"]))["timestamp"].is_between(start, end, closed="left")
    asx = every_day.filter(in_day.to_arrow())
    binance = to_trades_arrow(binance_trades(3_000, BINANCE_END))
    table = IcebergResource(catalog_properties=spark_lake.catalog_properties()).trades()
    table.append(asx)
    append_in_chunks(table, binance, 1_000)
    return pa.concat_tables([asx, binance])


def test_spark_reads_market_trades_with_the_same_per_symbol_answers_as_duckdb(spark_lake, lake_trades, k2_home):
    print(f"\nSpark session start: {spark_lake.started_in_seconds:.1f}s")
    spark_answer = _rows(
        spark_lake.session.sql(PER_SYMBOL_SQL.format(table=f"{spark_lake.catalog_name}.market.trades")).toArrow()
    )
    duckdb = DuckDBQueryResource(iceberg=IcebergResource(catalog_properties=spark_lake.catalog_properties()))
    duckdb_answer = _rows(duckdb.query(PER_SYMBOL_SQL.format(table="market.trades")))

    assert {row["exchange"] for row in spark_answer} == {"ASX", "BINANCE"}
    assert sum(row["trades"] for row in spark_answer) == lake_trades.num_rows
    assert spark_answer == duckdb_answer
    assert spark_answer == _written_per_symbol(lake_trades)


def _comparable(bars: pl.DataFrame) -> pa.Table:
    """Bars in OHLCV's Arrow schema, in key order, with the run-time ``computed_at`` set to one instant."""
    fixed = pl.lit(datetime(2000, 1, 1, tzinfo=UTC)).dt.cast_time_unit("us")
    return bars.with_columns(fixed.alias("computed_at")).sort(BAR_KEY).to_arrow().cast(OHLCV.arrow_schema())


def test_spark_engine_commits_the_same_ohlcv_bars_as_the_in_process_engine(spark_lake, lake_trades, k2_home):
    iceberg = IcebergResource(catalog_properties=spark_lake.catalog_properties())
    resources = {"iceberg": iceberg, "analytics": AnalyticsEngineResource(engine="spark")}
    with DagsterInstance.ephemeral() as instance:
        results = {
            "asx_ohlcv": materialize([asx_ohlcv], partition_key=ASX_DAY, resources=resources, instance=instance),
            "binance_ohlcv": materialize([binance_ohlcv], resources=resources, instance=instance),
        }
    for asset_name, result in results.items():
        assert result.success, asset_name
        metadata = result.asset_materializations_for_node(asset_name)[0].metadata
        assert metadata["engine"].value == "spark", asset_name
        checks = result.get_asset_check_evaluations()
        assert len(checks) == 3 and all(check.passed for check in checks), {c.check_name: c.metadata for c in checks}

    trades = iceberg.trades()
    snapshot_id = trades.current_snapshot().snapshot_id
    ohlcv = ohlcv_table(iceberg.catalog())
    for exchange, (start, end) in {"ASX": exchange_day_bounds("ASX", ASX_DAY), "BINANCE": BINANCE_DAYS}.items():
        committed = stored_bars(ohlcv, exchange, start, end)
        in_process = ohlcv_bars(read_trades(trades, snapshot_id, RowFilter(None, start, end, exchange)))
        assert committed.height == in_process.height > 0, exchange
        assert set(committed["interval"]) == {"1m", "5m", "1h", "1d"}
        assert _comparable(committed).equals(_comparable(in_process)), exchange
        days = committed.filter(pl.col("interval") == "1d")["bucket_start"].n_unique()
        assert days == {"ASX": 1, "BINANCE": 2}[exchange], (exchange, days)  # Binance's trades cross midnight
    assert ohlcv.current_snapshot().summary["k2.ohlcv.source-snapshot"] == str(snapshot_id)


def test_spark_reads_market_trades_through_the_rest_catalog_on_s3(spark_lake, object_store, lake_trades):
    properties = object_store.catalog_properties()
    drop_k2_tables(rest_catalog(object_store))
    iceberg = IcebergResource(catalog_name="k2rest", catalog_properties=properties)
    append_in_chunks(iceberg.trades(), lake_trades, 20_000)

    # The same process-wide session, with the REST catalog registered beside the embedded one.
    session = spark_session(catalog_name="k2rest", properties=properties)
    assert session is spark_lake.session
    spark_answer = _rows(session.sql(PER_SYMBOL_SQL.format(table="k2rest.market.trades")).toArrow())

    assert sum(row["trades"] for row in spark_answer) == lake_trades.num_rows
    assert spark_answer == _written_per_symbol(iceberg.trades().scan().to_arrow())
    assert spark_answer == _written_per_symbol(lake_trades)
