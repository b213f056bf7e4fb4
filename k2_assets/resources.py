"""Every resource K2's assets, checks, sensors and jobs use, built once, in one place.

With no settings at all they point at the embedded default: the Kafka broker that `k2 run`
(or `k2 kafka start`) runs on 127.0.0.1, the SQLite Iceberg catalog under K2_HOME and the
bundled ASX files. Each reads its settings from the environment (K2_KAFKA_BOOTSTRAP,
K2_ICEBERG_CATALOG_URI and friends, K2_ALERT_WEBHOOKS), so a deployment changes variables,
not code. The domains' Definitions declare no resources of their own.
"""

from __future__ import annotations

from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.asx.source import AsxSourceResource
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.resource import RESOURCE_KEY as DEGRADATION_KEY
from k2_resources.degradation.resource import DegradationResource
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.security import HYBRID, SINK
from k2_resources.operations.maintenance import TableMaintenanceResource
from k2_resources.query.duckdb_query import DuckDBQueryResource
from k2_resources.sink.resource import TradeSinkResource
from k2_resources.trades.hybrid import HybridQueryResource
from k2_sensors.operations.alerts import RESOURCE_KEY as ALERTS_KEY
from k2_sensors.operations.alerts import AlertWebhookResource


def build_resources() -> dict[str, object]:
    """The resources by key; the DuckDB and hybrid resources share the one Iceberg resource. The Kafka
    clients of the sensor and the sink, and those of the hybrid reads, each use their role's principal."""
    iceberg = IcebergResource()
    kafka = KafkaResource(role=SINK)  # the sensor's and the sink's principal on a secured cluster
    return {
        "kafka": kafka,
        "iceberg": iceberg,
        "duckdb": DuckDBQueryResource(iceberg=iceberg),
        "hybrid": HybridQueryResource(kafka=KafkaResource(role=HYBRID), iceberg=iceberg),
        "sink": TradeSinkResource(),
        "asx_source": AsxSourceResource(),
        "maintenance": TableMaintenanceResource(),
        "analytics": AnalyticsEngineResource(),
        DEGRADATION_KEY: DegradationResource(),
        ALERTS_KEY: AlertWebhookResource(),
    }
