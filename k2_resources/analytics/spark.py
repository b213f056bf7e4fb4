"""SparkResource: K2's Spark settings (master URL, driver size) as a Dagster resource.

The session itself (jars from infra/spark/pom.xml, K2's catalog, one per process) is built by
:mod:`k2_resources.analytics.spark_session`.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from k2_resources.analytics.spark_session import DEFAULT_MASTER, spark_session


class SparkResource(ConfigurableResource):
    """Where Spark runs (``master``) and how big its driver is; ``session()`` gives the shared session."""

    master: str = Field(
        default_factory=lambda: os.environ.get("K2_SPARK_MASTER", DEFAULT_MASTER),
        description="Spark master URL (env K2_SPARK_MASTER): local[2] runs Spark in a JVM this process starts; "
        "spark://host:7077 a standalone cluster",
    )
    driver_memory: str = Field(default_factory=lambda: os.environ.get("K2_SPARK_DRIVER_MEMORY", "1g"))
    shuffle_partitions: int = Field(default=4, description="spark.sql.shuffle.partitions (bars are small)")

    def session(self, catalog_name: str = "k2", properties: dict[str, str] | None = None) -> Any:
        """The process' Spark session (pyspark SparkSession) with K2's catalog (``properties``: pyiceberg's;
        default: K2's settings) registered as ``catalog_name``. Started on first call (seconds), then reused."""
        return spark_session(self.master, catalog_name, properties, self.driver_memory, self.shuffle_partitions)
