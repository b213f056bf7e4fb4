"""The resources every K2 asset, sensor and job uses, picked per environment.

With no settings at all they point at the embedded default: the Kafka broker that
`k2 kafka start` runs on 127.0.0.1 and the SQLite Iceberg catalog under K2_HOME. Set
K2_KAFKA_BOOTSTRAP and K2_ICEBERG_CATALOG_URI (and friends) to point them elsewhere.
"""

from __future__ import annotations

from k2_resources.degradation.resource import RESOURCE_KEY as DEGRADATION_KEY
from k2_resources.duckdb_query import DuckDBQueryResource
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.trades.sink_settings import TradeSinkResource
from k2_sensors.operations import defs as operations_defs


def build_resources() -> dict[str, object]:
    iceberg = IcebergResource()
    return {
        "kafka": KafkaResource(),
        "iceberg": iceberg,
        "duckdb": DuckDBQueryResource(iceberg=iceberg),
        "sink": TradeSinkResource(),
        DEGRADATION_KEY: operations_defs.resources[DEGRADATION_KEY],  # the same object: Definitions.merge needs one
    }
