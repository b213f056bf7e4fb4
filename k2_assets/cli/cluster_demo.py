"""The scale-out demo (`k2 demo cluster`): K2 on the local cluster topology, a broker killed mid-stream.

In a fresh K2_HOME it starts the topology of `k2 cluster` (3 KRaft brokers with replication 3 and
``min.insync.replicas=2``; SeaweedFS serving S3 and the Iceberg REST catalog; Postgres holding the
Dagster instance), points K2 at it through the same environment variables a real cluster takes,
streams the bundled Binance recording through K2's streamer into the 6-partition Binance topic,
kills one broker with SIGKILL half-way and starts it again, drives the real stream sensor and its
micro-batch runs until the lag is zero, counts what Iceberg holds, reads the table with Spark and
compares Spark's OHLCV bars with the in-process engine's, then stops everything it started.

Its functions that touch Dagster import :mod:`k2_assets.definitions` only once the topology's
variables are set: the resources read them when the definitions are built.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from dagster import DagsterInstance
from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from pyiceberg.expressions import EqualTo

from k2_resources.analytics.engine import AnalyticsEngineResource
from k2_resources.analytics.spark import SparkResource
from k2_resources.analytics.spark_session import stop_spark
from k2_resources.binance.recording_server import RecordingServerThread, Tape, load_recorded_trades
from k2_resources.binance.streamer import stream_to_kafka
from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.tables import OHLCV, TRADES
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_PARTITIONS, BINANCE_TRADES_TOPIC
from k2_resources.operations.dagster_instance import POSTGRES_INSTANCE_CONFIG, prepare_instance
from k2_resources.paths import dagster_home
from k2_resources.platform.cluster_env import cluster_home, write_env_file
from k2_resources.platform.cluster_services import ObjectStore, Postgres, object_store, postgres
from k2_resources.platform.kafka_cluster import KafkaCluster
from k2_resources.trades.iceberg_read import RowFilter
from k2_sensors.binance.driver import drive

# The recording plays for about this long, so the kill lands while the streamer is writing.
PLAYBACK_S = 15.0
# Spark's bars and the in-process engine's are compared at one fixed "computed at" time.
COMPARED_AT = datetime(2026, 1, 1, tzinfo=UTC)


def _say(message: str) -> None:
    print(message, flush=True)


@dataclass
class LocalTopology:
    """The running services of the local topology and the variables that point K2 at them."""

    kafka: KafkaCluster
    store: ObjectStore | None = None
    dagster_postgres: Postgres | None = None
    env: dict[str, str] = field(default_factory=dict)
    start_seconds: float = 0.0

    def stop(self) -> None:
        """Stop every service that was started, in reverse order; each is a no-op when not running."""
        for stop in (
            self.dagster_postgres and self.dagster_postgres.stop,
            self.store and self.store.stop,
            self.kafka.stop,
        ):
            if stop:
                try:
                    stop()
                except Exception as exc:
                    _say(f"stopping a service failed: {exc}")


def start_topology(home: Path) -> LocalTopology:
    """Start the topology under ``home`` (K2_HOME/cluster), write its env.sh and set its variables here.

    On a failure, whatever started is stopped again before the error is raised.
    """
    topology = LocalTopology(kafka=KafkaCluster(home=home))
    began = time.monotonic()
    try:
        _say("starting 3 Kafka brokers ...")
        topology.kafka.start()
        topology.env.update(topology.kafka.env())
        _say("starting SeaweedFS (S3 + Iceberg REST catalog) ...")
        topology.store = object_store(home)
        topology.env.update(topology.store.start())
        _say("starting Postgres (Dagster instance storage) ...")
        topology.dagster_postgres = postgres(home)
        topology.env.update(topology.dagster_postgres.start())
    except BaseException:
        topology.stop()
        raise
    topology.start_seconds = round(time.monotonic() - began, 1)
    write_env_file(topology.env, home)
    os.environ.update(topology.env)
    _say(f"topology ready in {topology.start_seconds}s ({topology.kafka.bootstrap_servers})")
    return topology


def partition_leaders(bootstrap_servers: str, topic: str) -> dict[int, dict[str, Any]]:
    """Per partition of ``topic``: its leader and replicas (broker ids)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        [described] = admin.describe_topics([topic])
        return {
            p["partition_index"]: {"leader": p["leader_id"], "replicas": sorted(p["replica_nodes"])}
            for p in described["partitions"]
        }
    finally:
        admin.close()


def topic_setting(bootstrap_servers: str, topic: str, name: str) -> str | None:
    """One setting of ``topic`` as the cluster reports it."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers)
    try:
        result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, [name])])
    finally:
        admin.close()
    entry = result["topic"][topic].get(name)
    return None if entry is None else str(entry["value"])


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise K2Error(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class StreamWithKill:
    """Streams the recording into ``topic`` while killing and restarting one broker, in a thread of its own."""

    cluster: KafkaCluster
    topic: str
    result: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> StreamWithKill:
        self.thread = threading.Thread(target=self._run, name="k2-demo-stream-and-kill", daemon=True)
        self.thread.start()
        return self

    def done(self) -> bool:
        return self.thread is not None and not self.thread.is_alive()

    def _run(self) -> None:
        try:
            self._stream_and_kill()
        except BaseException as exc:
            self.error = exc

    def _stream_and_kill(self) -> None:
        kafka = KafkaResource()
        trades = load_recorded_trades()

        def produced() -> int:
            try:
                return sum(kafka.end_offsets(self.topic).values())
            except Exception:
                return -1

        speed = Tape(trades).compressed_span_ms / 1000 / PLAYBACK_S
        stream_outcome: dict[str, Any] = {}
        with RecordingServerThread(trades=trades, speed=speed, loop=False) as server:

            def stream() -> None:
                stream_outcome["stats"] = stream_to_kafka(
                    server.url,
                    self.topic,
                    kafka,
                    partitions=BINANCE_TRADES_PARTITIONS,
                    idle_timeout_s=60,
                    backoff_initial_s=0.05,
                    backoff_max_s=0.5,
                )

            streamer = threading.Thread(target=stream, name="k2-demo-streamer", daemon=True)
            streamer.start()
            _say(f"streaming {len(trades)} recorded trades from {server.url} over ~{PLAYBACK_S:.0f}s ...")
            _wait(
                lambda: produced() >= len(trades) // 2 or not streamer.is_alive(),
                180,
                "the streamer to put half of the recording in Kafka",
            )
            if not streamer.is_alive():
                raise K2Error("the stream ended before the broker kill; the recording played too fast")
            victim = partition_leaders(self.cluster.bootstrap_servers, self.topic)[0]["leader"]
            killed_at = produced()
            self.cluster.kill(victim)
            _say(f"killed broker {victim} (kill -9) at {killed_at} trades")
            _wait(
                lambda: produced() >= killed_at + len(trades) // 10 or not streamer.is_alive(),
                180,
                f"the stream to go on with broker {victim} dead",
            )
            restart_began = time.monotonic()
            self.cluster.restart(victim)
            restart_s = round(time.monotonic() - restart_began, 1)
            _say(f"broker {victim} restarted in {restart_s}s")
            streamer.join(timeout=300)
            if streamer.is_alive():
                raise K2Error("the streamer did not finish the recording within 300 s")
            self.result.update(
                source_trades=server.stats().unique_trades,
                killed_broker=victim,
                killed_at_trades=killed_at,
                broker_restart_seconds=restart_s,
                kafka_records=produced(),
            )


def iceberg_counts(exchange: str) -> dict[str, int]:
    """Rows and distinct trade ids of ``exchange`` in market.trades (pyiceberg, through K2's catalog)."""
    rows = (
        IcebergResource()
        .trades()
        .scan(row_filter=EqualTo(term="exchange", value=exchange), selected_fields=("trade_id",))
        .to_arrow()
    )
    return {
        "iceberg_trades": rows.num_rows,
        "iceberg_distinct_trade_ids": len(set(rows.column("trade_id").to_pylist())),
    }


def warm_up_spark() -> threading.Thread:
    """Start the process' Spark session (tens of seconds: a JVM) in a thread, beside the stream, so the
    read at the end does not wait for it. Failures are left for :func:`read_with_spark` to report."""

    def start() -> None:
        try:
            iceberg = IcebergResource()
            SparkResource().session(iceberg.catalog_name, iceberg.catalog_properties)
        except Exception:
            pass

    thread = threading.Thread(target=start, name="k2-demo-spark-start", daemon=True)
    thread.start()
    return thread


def comparable(bars: pl.DataFrame) -> Any:
    """Bars in OHLCV's Arrow schema and key order (a pyarrow Table), for an exact comparison."""
    return (
        bars.sort("interval", "symbol", "exchange", "bucket_start")
        .select(OHLCV.arrow_schema().names)
        .to_arrow()
        .cast(OHLCV.arrow_schema())
    )


def read_with_spark(exchange: str) -> dict[str, Any]:
    """Spark's count of ``exchange``'s trades and whether its OHLCV bars equal the in-process engine's,
    both at the same snapshot of market.trades; ``spark_error`` instead when Spark is not available."""
    iceberg = IcebergResource()
    table = iceberg.trades()
    snapshot = table.current_snapshot()
    snapshot_id = None if snapshot is None else snapshot.snapshot_id
    began = time.monotonic()
    try:
        spark = SparkResource()
        session = spark.session(iceberg.catalog_name, iceberg.catalog_properties)
        reader = session.read if snapshot_id is None else session.read.option("snapshot-id", str(snapshot_id))
        spark_trades = (
            reader.table(f"{iceberg.catalog_name}.{TRADES.identifier}").where(f"exchange = '{exchange}'").count()
        )  # a constant, not input
        row_filter = RowFilter(exchange=exchange)
        in_spark = AnalyticsEngineResource(engine="spark", spark=spark).ohlcv_bars(
            iceberg, table, snapshot_id, row_filter, computed_at=COMPARED_AT
        )
        in_process = AnalyticsEngineResource(engine="polars").ohlcv_bars(
            iceberg, table, snapshot_id, row_filter, computed_at=COMPARED_AT
        )
        equal = in_spark.height == in_process.height > 0 and comparable(in_spark).equals(comparable(in_process))
        return {
            "spark_trades": spark_trades,
            "spark_ohlcv_equal": bool(equal),
            "spark_ohlcv_bars": in_spark.height,
            "spark_seconds": round(time.monotonic() - began, 1),
        }
    except K2Error as exc:
        return {"spark_trades": None, "spark_ohlcv_equal": None, "spark_error": str(exc)}
    finally:
        stop_spark()


def run_cluster_demo(home: Path, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run the demo with ``home`` as K2_HOME (already set in the environment) and return its summary."""
    started = time.monotonic()
    _say(f"K2_HOME={home}")
    topology = start_topology(cluster_home())
    try:
        return _run_on(topology, started, timeout_s)
    finally:
        stop_spark()  # a no-op unless a failure left the session of warm_up_spark running
        _say("stopping the topology ...")
        topology.stop()


def _run_on(topology: LocalTopology, started: float, timeout_s: float) -> dict[str, Any]:
    # Imported once the topology's variables are set: the definitions' resources read them when built.
    from k2_assets.definitions import defs

    cluster = topology.kafka
    kafka = KafkaResource()
    kafka.ensure_topic(BINANCE_TRADES_TOPIC, partitions=BINANCE_TRADES_PARTITIONS)
    leaders = partition_leaders(cluster.bootstrap_servers, BINANCE_TRADES_TOPIC)
    replication = len(leaders[0]["replicas"])
    min_isr = topic_setting(cluster.bootstrap_servers, BINANCE_TRADES_TOPIC, "min.insync.replicas")

    prepare_instance(dagster_home(), config=POSTGRES_INSTANCE_CONFIG)  # created once, before anything opens it
    stream = StreamWithKill(cluster, BINANCE_TRADES_TOPIC)
    spark_starting = warm_up_spark()
    with DagsterInstance.from_config(str(dagster_home())) as instance:
        stream.start()
        report = drive(
            instance,
            defs,
            until=lambda r: stream.done() and r.lag == 0,
            timeout_s=max(60.0, timeout_s - (time.monotonic() - started)),
            run_log_level="WARNING",
        )
    if stream.thread is not None:
        stream.thread.join(timeout=60)
    if stream.error is not None:
        raise K2Error(f"streaming with a broker kill failed: {stream.error}") from stream.error
    _say(
        f"stream sensor: {report.ticks} ticks, {report.runs} micro-batch runs ({report.failed_runs} failed), "
        f"lag {report.lag}"
    )

    counts = iceberg_counts("BINANCE")
    spark_starting.join()
    _say(f"Iceberg holds {counts['iceberg_trades']} Binance trades; reading them with Spark ...")
    spark = read_with_spark("BINANCE")
    storage = "s3" if os.environ.get("K2_ICEBERG_WAREHOUSE", "").startswith("s3://") else "file"
    return {
        "brokers": len(cluster.live_brokers()),
        "replication_factor": replication,
        "min_insync_replicas": int(min_isr) if min_isr else None,
        "partitions": len(leaders),
        "killed_broker": stream.result.get("killed_broker"),
        "killed_at_trades": stream.result.get("killed_at_trades"),
        "broker_restart_seconds": stream.result.get("broker_restart_seconds"),
        "catalog": os.environ.get("K2_ICEBERG_CATALOG_TYPE", "sql"),
        "storage": storage,
        "dagster_storage": "postgres",
        "source_trades": stream.result.get("source_trades"),
        "kafka_records": stream.result.get("kafka_records"),
        **counts,
        **spark,
        "lag": report.lag,
        "micro_batch_runs": report.runs,
        "failed_runs": report.failed_runs,
        "checks": {
            name: "PASSED" if check["passed"] else "FAILED" for name, check in sorted(report.last_checks.items())
        },
        "start_seconds": topology.start_seconds,
        "seconds": round(time.monotonic() - started, 1),
    }
