"""The scale-out demo (`k2 demo cluster`): K2 on the local cluster topology, a broker killed mid-stream.

In a fresh K2_HOME it starts the topology of `k2 cluster` (3 KRaft brokers with replication 3 and
``min.insync.replicas=2``; SeaweedFS serving S3 and the Iceberg REST catalog; Postgres holding the
Dagster instance), points K2 at it through the same environment variables a real cluster takes,
streams the bundled Binance recording through K2's streamer into the 6-partition Binance topic,
kills one broker with SIGKILL at a point of the playback chosen by --kill-at or drawn from a seed
(both reported; its last seconds included, where the failover must fit under the streamer's close
deadline: k2_resources/platform/failover.py), starts it again once the others lead its partitions,
drives the real stream sensor and its micro-batch runs until the lag is zero, counts what Iceberg
holds, reads the table with Spark and compares Spark's OHLCV bars with the in-process engine's,
then stops everything it started.

Its functions that touch Dagster import :mod:`k2_assets.definitions` only once the topology's
variables are set: the resources read them when the definitions are built.
"""

from __future__ import annotations

import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
from dagster import DagsterInstance
from kafka import KafkaAdminClient, TopicPartition
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
from k2_resources.kafka.security import ADMIN, HYBRID, STREAMER, client_security, is_security_failure
from k2_resources.kafka.topics import BINANCE_TRADES_PARTITIONS, BINANCE_TRADES_TOPIC
from k2_resources.operations.dagster_instance import POSTGRES_INSTANCE_CONFIG, prepare_instance
from k2_resources.paths import dagster_home
from k2_resources.platform.cluster_env import cluster_home, write_env_file
from k2_resources.platform.cluster_services import ObjectStore, Postgres, object_store, postgres
from k2_resources.platform.failover import CLOSE_TIMEOUT_S, FAILOVER_BOUND_MS
from k2_resources.platform.kafka_cluster import KafkaCluster
from k2_resources.trades.iceberg_read import RowFilter
from k2_sensors.binance.driver import drive

# The recording plays for about this long; the kill lands once Kafka holds a chosen share of it (KillPoint).
PLAYBACK_S = 45.0
# How long the local server waits for the streamer to read the end-of-recording close (the streamer
# reads every frame before it: under load, long after the server sent them).
SERVER_CLOSE_TIMEOUT_S = 300.0
# How long the demo waits for the failover it measures: past every client deadline that waits on it.
FAILOVER_WAIT_S = 120.0
# Trades the server resends when the streamer reconnects: within the duplicate check's window, and
# fewer ids than a reset's jump (k2_resources/binance/dedupe.py).
RESUME_OVERLAP = 5_000
# What the summary reports of the kill (StreamWithKill.result).
KILL_REPORT = (
    "kill_at",
    "kill_seed",
    "killed_broker",
    "killed_at_trades",
    "failover_seconds",
    "stream_closed_after_kill_seconds",
    "recording_ended_before_restart",
    "broker_restart_seconds",
)
# What the summary reports of the streamer's run (StreamStats).
STREAMER_REPORT = (
    "streamer_received",
    "streamer_ended_by",
    "streamer_reconnects",
    "streamer_gaps_filled",
    "streamer_spooled",
    "streamer_undelivered",
)
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
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_security(ADMIN).kafka_python())
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
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, **client_security(ADMIN).kafka_python())
    try:
        result = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, [name])])
    finally:
        admin.close()
    entry = result["topic"][topic].get(name)
    return None if entry is None else str(entry["value"])


@dataclass(frozen=True)
class KillPoint:
    """When the broker dies: once Kafka holds ``fraction`` of the recording's trades (0 at the first,
    1 at the last: during the streamer's final flush and close), given with --kill-at or drawn from
    ``seed`` (reported, so a run can be repeated). Counted in Kafka, not in the server's playback:
    on a loaded machine the streamer may run well behind the server, and it is the stream's own end
    that a late kill must meet."""

    fraction: float
    seed: int | None = None

    @classmethod
    def choose(cls, kill_at: float | None = None, seed: int | None = None) -> KillPoint:
        """``kill_at`` when given, else a point drawn from ``seed`` (a new random seed when None).

        Drawn points span the whole stream, its last seconds included: a kill there meets the
        streamer's end-of-stream flush and close, the moment a failover must fit under
        (k2_resources/platform/failover.py)."""
        if kill_at is not None:
            if not 0.0 <= kill_at <= 1.0:
                raise K2Error(f"--kill-at {kill_at} is not a fraction of the stream; give one from 0 to 1")
            return cls(kill_at)
        seed = secrets.randbelow(2**31) if seed is None else seed
        return cls(round(random.Random(seed).uniform(0.05, 1.0), 3), seed)

    def records(self, total: int) -> int:
        """How many of ``total`` trades are in Kafka when the kill is due."""
        return max(1, min(total, round(self.fraction * total)))


def records_in(kafka: KafkaResource, topic: str) -> tuple[Callable[[], int], Callable[[], None]]:
    """(count, close): the records in ``topic`` (its end offsets added up; -1 when Kafka does not
    answer), asked through one consumer kept open, and the function closing it."""
    consumer = kafka.consumer()
    partitions = [TopicPartition(topic, p) for p in range(BINANCE_TRADES_PARTITIONS)]

    def count() -> int:
        try:
            return sum(consumer.end_offsets(partitions).values())
        except Exception:
            return -1

    return count, consumer.close


def _wait(condition: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise K2Error(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def _led_elsewhere(admin: KafkaAdminClient, topic: str, victim: int) -> bool:
    """Whether ``admin`` (connected to the survivors) finds ``victim`` fenced (gone from the cluster's
    live brokers) and every partition of ``topic`` led by another broker."""
    try:
        brokers = admin.describe_cluster()["brokers"]
        if victim in {broker["broker_id"] for broker in brokers if not broker.get("is_fenced", False)}:
            return False
        [described] = admin.describe_topics([topic])
    except Exception:
        return False  # a survivor busy with the failover: ask again
    leaders = [partition["leader_id"] for partition in described.get("partitions") or []]
    return bool(leaders) and all(leader not in (victim, -1) for leader in leaders)


@dataclass
class StreamWithKill:
    """Streams the recording into ``topic`` while killing and restarting one broker, in a thread of its own.

    The leader of partition 0 dies (SIGKILL) once the recording server has played ``kill_point`` of
    the recording; the demo then measures how long the cluster took to fence it and lead its
    partitions elsewhere, lets the stream go on (or end) on two brokers, and starts it again."""

    cluster: KafkaCluster
    topic: str
    kill_point: KillPoint
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
        kafka = KafkaResource(role=STREAMER)
        trades = load_recorded_trades()
        speed = Tape(trades).compressed_span_ms / 1000 / PLAYBACK_S
        outcome: dict[str, Any] = {}
        # The demo's fault is the broker. On a loaded machine the streamer (sharing this process with the
        # micro-batch runs and Spark's start) can fall behind the local server; the server neither drops
        # that slow reader (no keepalive) nor cuts the end-of-recording close short, which would discard
        # the frames still unread on the socket: a trailing loss no trade-id gap reveals. Should the
        # connection drop anyway, the server resends the last RESUME_OVERLAP trades on the
        # reconnect (repeats the duplicate check drops) and the gap fill asks for any older ones.
        server_options = {
            "ping_interval": None,
            "close_timeout": SERVER_CLOSE_TIMEOUT_S,
            "resume_overlap": RESUME_OVERLAP,
        }
        with RecordingServerThread(trades=trades, speed=speed, loop=False, **server_options) as server:

            def stream() -> None:
                outcome["stats"] = stream_to_kafka(
                    server.url,
                    self.topic,
                    kafka,
                    partitions=BINANCE_TRADES_PARTITIONS,
                    idle_timeout_s=60,
                    backoff_initial_s=0.05,
                    backoff_max_s=0.5,
                    ping_interval_s=None,  # no keepalive either way: a lagging streamer keeps its connection
                )
                outcome["closed_at"] = time.monotonic()

            streamer = threading.Thread(target=stream, name="k2-demo-streamer", daemon=True)
            streamer.start()
            due = self.kill_point.records(len(trades))
            _say(
                f"streaming {len(trades)} recorded trades from {server.url} over ~{PLAYBACK_S:.0f}s; "
                f"broker kill at {self.kill_point.fraction:.0%} of them in Kafka ({due})"
            )
            produced, stop_counting = records_in(kafka, self.topic)
            try:
                _wait(
                    lambda: produced() >= due or not streamer.is_alive(),
                    600,
                    f"{due} trades in Kafka",
                    interval_s=0.05,
                )
                if not streamer.is_alive():
                    raise K2Error(f"the stream ended before the broker kill: {outcome.get('stats')}")
                self._kill_fail_over_and_restart(server, streamer, produced, len(trades))
            finally:
                stop_counting()
            streamer.join(timeout=300)
            if streamer.is_alive():
                raise K2Error("the streamer did not finish the recording within 300 s")
        stats = outcome["stats"]
        self.result.update(
            source_trades=server.stats().unique_trades,
            kafka_records=sum(kafka.end_offsets(self.topic).values()),
            stream_closed_after_kill_seconds=round(outcome["closed_at"] - self.result.pop("_killed_at"), 1),
            streamer_received=stats.received,
            streamer_ended_by=stats.ended_by,
            streamer_reconnects=stats.reconnects,
            streamer_gaps_filled=stats.gaps_filled,
            streamer_spooled=stats.spooled,
            streamer_undelivered=stats.undelivered,
        )

    def _kill_fail_over_and_restart(
        self, server: RecordingServerThread, streamer: threading.Thread, produced: Callable[[], int], total: int
    ) -> None:
        """Kill partition 0's leader, wait until the others lead its partitions, let the stream go
        on (or end), then start the broker again; the timings go into ``result``."""
        victim = partition_leaders(self.cluster.bootstrap_servers, self.topic)[0]["leader"]
        # One client to the survivors, connected before the kill: each look is then two requests.
        survivors = ",".join(b.bootstrap_servers for b in self.cluster.nodes() if b.node_id != victim)
        admin = KafkaResource(bootstrap_servers=survivors).admin()
        in_kafka_at_kill = produced()
        killed_at = time.monotonic()
        self.cluster.kill(victim)
        _say(f"killed broker {victim} (kill -9) with {in_kafka_at_kill} of {total} trades in Kafka")
        try:
            _wait(
                lambda: _led_elsewhere(admin, self.topic, victim),
                FAILOVER_WAIT_S,
                f"broker {victim} fenced and its partitions led by the others",
                interval_s=0.1,
            )
        finally:
            admin.close()
        failover_s = round(time.monotonic() - killed_at, 1)
        _say(f"broker {victim} fenced and its partitions led elsewhere {failover_s}s after the kill")
        _wait(
            lambda: produced() >= min(total, in_kafka_at_kill + total // 10) or not streamer.is_alive(),
            180,
            f"the stream to go on (or end) with broker {victim} dead",
            interval_s=0.5,
        )
        ended = server.stats().finished
        restart_began = time.monotonic()
        self.cluster.restart(victim)
        restart_s = round(time.monotonic() - restart_began, 1)
        _say(f"broker {victim} restarted in {restart_s}s")
        self.result.update(
            _killed_at=killed_at,
            killed_broker=victim,
            killed_at_trades=in_kafka_at_kill,
            kill_at=self.kill_point.fraction,
            kill_seed=self.kill_point.seed,
            failover_seconds=failover_s,
            recording_ended_before_restart=ended,
            broker_restart_seconds=restart_s,
        )


def unauthorized_produce_probe(topic: str) -> dict[str, Any]:
    """Try to produce one record to ``topic`` as a principal without the ACL (the hybrid reader's) and
    say whether the cluster refused it with an authorization error and wrote nothing.

    Only on a secured cluster: on a PLAINTEXT one the record would land among the trades."""
    reader = KafkaResource(role=HYBRID, request_timeout_ms=15_000)
    settings = reader.security()
    if not settings.secured:
        return {"unauthorized_produce_refused": False, "unauthorized_produce_error": "the cluster is PLAINTEXT"}
    before = KafkaResource().end_offsets(topic)
    error: BaseException | None = None
    producer = reader.producer(enable_idempotence=False, retries=0, max_block_ms=15_000)
    try:
        producer.send(topic, key=b"probe", value=b"a forged trade").get(timeout=30)
    except Exception as exc:  # the refusal is the expected outcome
        error = exc
    finally:
        producer.close(timeout=5)
    written = sum(KafkaResource().end_offsets(topic).values()) - sum(before.values())
    refused = error is not None and is_security_failure(error) and written == 0
    message = str(settings.failure(reader.servers, error)) if error is not None else f"{written} record(s) written"
    _say(f"unauthorized produce to {topic} as {settings.principal}: {'refused' if refused else 'NOT refused'}")
    return {"unauthorized_produce_refused": refused, "unauthorized_produce_error": message}


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


def run_cluster_demo(home: Path, timeout_s: float = 900.0, kill_point: KillPoint | None = None) -> dict[str, Any]:
    """Run the demo with ``home`` as K2_HOME (already set in the environment) and return its summary;
    the broker dies at ``kill_point`` (default: a point drawn from a new seed, reported)."""
    started = time.monotonic()
    _say(f"K2_HOME={home}")
    topology = start_topology(cluster_home())
    try:
        return _run_on(topology, started, timeout_s, kill_point or KillPoint.choose())
    finally:
        stop_spark()  # a no-op unless a failure left the session of warm_up_spark running
        _say("stopping the topology ...")
        topology.stop()


def _run_on(topology: LocalTopology, started: float, timeout_s: float, kill_point: KillPoint) -> dict[str, Any]:
    # Imported once the topology's variables are set: the definitions' resources read them when built.
    from k2_assets.definitions import defs

    cluster = topology.kafka
    kafka = KafkaResource()
    kafka.ensure_topic(BINANCE_TRADES_TOPIC, partitions=BINANCE_TRADES_PARTITIONS)
    leaders = partition_leaders(cluster.bootstrap_servers, BINANCE_TRADES_TOPIC)
    replication = len(leaders[0]["replicas"])
    min_isr = topic_setting(cluster.bootstrap_servers, BINANCE_TRADES_TOPIC, "min.insync.replicas")
    probe = unauthorized_produce_probe(BINANCE_TRADES_TOPIC)

    prepare_instance(dagster_home(), config=POSTGRES_INSTANCE_CONFIG)  # created once, before anything opens it
    stream = StreamWithKill(cluster, BINANCE_TRADES_TOPIC, kill_point)
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
        "kafka_security": cluster.security,
        **probe,
        **{name: stream.result.get(name) for name in KILL_REPORT},
        "failover_bound_seconds": FAILOVER_BOUND_MS / 1000,
        "close_timeout_seconds": CLOSE_TIMEOUT_S,
        "catalog": os.environ.get("K2_ICEBERG_CATALOG_TYPE", "sql"),
        "storage": storage,
        "dagster_storage": "postgres",
        "source_trades": stream.result.get("source_trades"),
        "kafka_records": stream.result.get("kafka_records"),
        **{name: stream.result.get(name) for name in STREAMER_REPORT},
        **counts,
        **spark,
        "lag": report.lag,
        "micro_batch_runs": report.runs,
        "failed_runs": report.failed_runs,
        "run_errors": report.run_errors,
        "failed_ticks": report.failed_ticks,  # sensor ticks a broker's failover failed, asked again
        "checks": {
            name: "PASSED" if check["passed"] else "FAILED" for name, check in sorted(report.last_checks.items())
        },
        "start_seconds": topology.start_seconds,
        "seconds": round(time.monotonic() - started, 1),
    }
