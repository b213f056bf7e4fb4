"""AnalyticsEngineResource: where the OHLCV bars are computed, in process (polars) or in Spark.

``K2_ANALYTICS_ENGINE=spark`` (with ``K2_SPARK_MASTER``, default ``local[2]``) makes the OHLCV
assets aggregate the trades in Spark, which reads ``market.trades`` through the same catalog; the
bars come back (they are small) and are committed to ``market.ohlcv`` by the same one-commit
replace as the in-process engine's, so both engines write the same rows the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import datetime

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field
from pyiceberg.table import Table

from k2_resources.analytics.ohlcv import INTERVALS, ohlcv_bars, read_trades
from k2_resources.analytics.spark import SparkResource
from k2_resources.analytics.spark_ohlcv import read_trades_in_spark, spark_ohlcv_bars
from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.trades.iceberg_read import RowFilter

ENGINES = ("polars", "spark")


class AnalyticsEngineResource(ConfigurableResource):
    """The engine of the heavy analytics assets: ``polars`` (default, in process) or ``spark``."""

    engine: str = Field(
        default_factory=lambda: os.environ.get("K2_ANALYTICS_ENGINE", "polars"),
        description="polars (in process) or spark (env K2_ANALYTICS_ENGINE)",
    )
    spark: SparkResource = Field(default_factory=SparkResource)

    @property
    def name(self) -> str:
        """The engine's name, checked."""
        engine = self.engine.strip().lower()
        if engine not in ENGINES:
            raise K2Error(f"K2_ANALYTICS_ENGINE={self.engine!r} is not an engine; use one of {', '.join(ENGINES)}")
        return engine

    def ohlcv_bars(
        self,
        iceberg: IcebergResource,
        table: Table,
        snapshot_id: int | None,
        row_filter: RowFilter,
        intervals: Iterable[str] = INTERVALS,
        trades: pl.DataFrame | None = None,
        computed_at: datetime | None = None,
    ) -> pl.DataFrame:
        """Bars of the trades of ``table`` (market.trades) at ``snapshot_id`` matching ``row_filter``.

        In process, ``trades`` (already read by the caller) saves a second read; Spark reads the
        trades itself through the catalog of ``iceberg``.
        """
        if self.name == "polars":
            frame = trades if trades is not None else read_trades(table, snapshot_id, row_filter)
            return ohlcv_bars(frame, intervals=intervals, computed_at=computed_at)
        session = self.spark.session(iceberg.catalog_name, iceberg.catalog_properties)
        spark_trades = read_trades_in_spark(session, iceberg.catalog_name, snapshot_id, row_filter)
        return spark_ohlcv_bars(spark_trades, intervals=intervals, computed_at=computed_at)
