"""Benchmark: Apache Iceberg's Kafka Connect sink (the peer) and K2's sink on the same 200K trades.

Writes bench-results/peer.json. One run, one broker:

- The 200K trades bench_stream uses (tests/support/trade_messages.py), 3 partitions, produced
  twice at once (the JSON copy from a second process): as K2's framed Avro (what K2's sink
  reads) and as plain JSON (what the peer reads:
  Connect's JsonConverter with schemas.enable=false; the peer has no converter for K2's Avro
  without a schema registry). Both topics hold the same trades at the same offsets.
- The peer: a standalone Kafka Connect worker (the Kafka version of infra/kafka/pom.xml) running
  ``org.apache.iceberg.connect.IcebergSinkConnector`` with one task, committing every second
  through Iceberg's JdbcCatalog into a pyiceberg SqlCatalog's SQLite database, into a
  ``market.trades`` created up front with K2's schema, partitioning and sort order. Its time runs
  from the JVM's launch to the commit timestamp of the snapshot that brought the table to 200K
  rows: JVM and worker start, the coordinator's election, the consume, and the last commit
  interval. Its steady rate is the rows committed after its first commit over the time between
  its first and last commits, so the start-up and the first interval are left out.
- K2: ``run_microbatch`` over the Avro topic in ranges of 50K, in this process with everything
  imported (as bench_stream measures it), and again in a new Python process timed from its launch
  (imports and catalog included), the counterpart of the peer's JVM start.

If the peer cannot run here, peer.json records what failed (the worker's log tail) and the
benchmark fails, rather than leaving the figures out silently.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest

from k2_resources.catalog.resource import IcebergResource
from k2_resources.catalog.settings import catalog_properties
from k2_resources.kafka.resource import KafkaResource
from k2_resources.paths import PROJECT_ROOT
from tests.support.k2_topic_sink import sink_topic
from tests.support.kafka_connect import IcebergConnectSink, PeerUnavailableError, connect_classpath, versions
from tests.support.trade_messages import PARTITIONS, produce_benchmark_topic

MESSAGES = 200_000
MICROBATCH = 50_000
COMMIT_INTERVAL_MS = 1_000
PEER_DEADLINE_S = 180.0


def _produce_both(kafka: KafkaResource, avro_topic: str, json_topic: str) -> dict[str, int]:
    """The same trades to both topics at once (JSON from a second process); the bytes of each."""
    env = {**os.environ, "K2_KAFKA_BOOTSTRAP": kafka.servers}
    json_filler = subprocess.Popen(
        [sys.executable, "-m", "tests.support.trade_messages", json_topic, str(MESSAGES), "json"],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        avro_bytes = produce_benchmark_topic(kafka, avro_topic, MESSAGES, "avro")
        out, _ = json_filler.communicate(timeout=600)
    finally:
        if json_filler.poll() is None:
            json_filler.kill()
    assert json_filler.returncode == 0
    assert kafka.end_offsets(avro_topic) == kafka.end_offsets(json_topic)
    return {"avro_bytes": avro_bytes, "json_bytes": int(out.strip().splitlines()[-1])}


def _k2_in_process(kafka: KafkaResource, topic: str) -> dict:
    iceberg = IcebergResource()
    iceberg.trades()  # the table exists in steady state: creating it is not the sink's work
    started = time.perf_counter()
    result = sink_topic(kafka, iceberg, topic, MICROBATCH)
    seconds = time.perf_counter() - started
    assert result["written"] == MESSAGES
    assert iceberg.trades().scan().count() == MESSAGES
    return {
        "seconds": round(seconds, 2),
        "msg_s": round(MESSAGES / seconds),
        "iceberg_commits": result["commits"],
        "values": _compared_values(iceberg),
    }


def _compared_values(iceberg: IcebergResource) -> pa.Table:
    """The columns both sinks must agree on, in message_id order (platform_sequence is K2's own)."""
    columns = ("message_id", "symbol", "timestamp", "price", "quantity", "side", "vendor_data")
    return iceberg.trades().scan(selected_fields=columns).to_arrow().sort_by("message_id")


def _k2_new_process(topic: str, home: Path) -> dict:
    """K2's sink in a fresh Python process, timed from launch to exit."""
    home.mkdir(parents=True)
    env = {**os.environ, "K2_HOME": str(home)}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "tests.support.k2_topic_sink", topic, str(MICROBATCH)],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["written"] == MESSAGES
    return {
        "seconds": round(seconds, 2),
        "msg_s": round(MESSAGES / seconds),
        "includes": "Python start, imports, catalog and table load, the sink",
    }


def _value_differences(left: pa.Table, right: pa.Table) -> list[str]:
    """Columns whose values differ, each with its first differing pair. vendor_data is compared as
    dicts (the peer writes map entries in Java's hash order) without K2's enrichment (``k2.*``
    keys), which only K2's sink adds."""
    differences = []
    if left.num_rows != right.num_rows:
        return [f"rows: {left.num_rows} != {right.num_rows}"]
    for name in left.column_names:
        mine, theirs = left.column(name).to_pylist(), right.column(name).to_pylist()
        if name == "vendor_data":
            mine, theirs = (
                [{k: v for k, v in (entries or []) if not k.startswith("k2.")} for entries in column]
                for column in (mine, theirs)
            )
        if mine != theirs:
            at = next(i for i, (m, t) in enumerate(zip(mine, theirs)) if m != t)
            differences.append(f"{name} (row {at}): {mine[at]!r} != {theirs[at]!r}")
    return differences


def _total_records(iceberg: IcebergResource) -> int:
    snapshot = iceberg.trades().current_snapshot()
    return int(snapshot.summary["total-records"]) if snapshot and snapshot.summary else 0


def _run_peer(kafka: KafkaResource, topic: str, home: Path, failure: dict, expected: pa.Table) -> dict:
    """Run the Iceberg sink on ``topic`` until its table holds every message; its figures."""
    iceberg = IcebergResource()
    iceberg.trades()  # created up front with K2's schema; the peer does not auto-create
    properties = catalog_properties()
    sink = IcebergConnectSink(
        home=home / "connect",
        bootstrap_servers=kafka.servers,
        topic=topic,
        table="market.trades",
        catalog_name=iceberg.catalog_name,
        catalog_db=Path(properties["uri"].removeprefix("sqlite:///")),
        warehouse=Path(properties["warehouse"].removeprefix("file://")),
        commit_interval_ms=COMMIT_INTERVAL_MS,
    )
    kafka.ensure_topic(sink.control_topic, partitions=1)
    connect_classpath(sink.home.parent)  # resolved before the clock starts (a first run downloads jars)
    failure["log"] = str(sink.log_file)
    launched_wall = time.time()
    launched = sink.start()
    try:
        rows = 0
        while rows < MESSAGES:
            if not sink.running():
                raise PeerUnavailableError(f"the Kafka Connect worker exited:\n{sink.log_tail()}")
            if sink.errors():
                raise PeerUnavailableError(
                    "the Iceberg sink task failed:\n" + "\n".join(sink.errors()[:5]) + "\n" + sink.log_tail()
                )
            if time.monotonic() - launched > PEER_DEADLINE_S:
                raise PeerUnavailableError(
                    f"the peer's table held {rows} of {MESSAGES} rows after {PEER_DEADLINE_S:.0f}s:\n{sink.log_tail()}"
                )
            time.sleep(0.5)  # polling the catalog at a modest pace, bounded by the deadline above
            rows = _total_records(iceberg)
        observed_s = time.monotonic() - launched
    finally:
        sink.stop()
    table = iceberg.trades()
    snapshots = sorted(table.snapshots(), key=lambda s: s.timestamp_ms)
    ids = table.scan(selected_fields=("message_id",)).to_arrow().column("message_id")
    first, last = snapshots[0], snapshots[-1]
    first_rows = int(first.summary["total-records"])
    total_s = last.timestamp_ms / 1000 - launched_wall
    steady_s = (last.timestamp_ms - first.timestamp_ms) / 1000
    summary_keys = sorted(k for k in (last.summary.additional_properties if last.summary else {}) if "kafka" in k)
    differences = _value_differences(expected, _compared_values(iceberg))
    return {
        "rows": len(ids),
        "values_differing_from_k2": differences,
        "distinct_message_ids": len(set(ids.to_pylist())),
        "seconds": round(total_s, 2),
        "observed_by_polling_s": round(observed_s, 2),
        "msg_s": round(MESSAGES / total_s),
        "first_commit_after_launch_s": round(first.timestamp_ms / 1000 - launched_wall, 2),
        "rows_in_first_commit": first_rows,
        "iceberg_commits": len(snapshots),
        "steady_msg_s": round((MESSAGES - first_rows) / steady_s) if len(snapshots) > 1 and steady_s > 0 else None,
        "snapshot_summary_kafka_keys": summary_keys,
        "worker_log": str(sink.log_file),
    }


@pytest.mark.timeout(900)
def test_peer_benchmark(k2_home, kafka_broker, topic_name, monkeypatch):
    kafka = KafkaResource()
    avro_topic, json_topic = f"{topic_name}-avro", f"{topic_name}-json"
    for topic in (avro_topic, json_topic):
        kafka.ensure_topic(topic, partitions=PARTITIONS)
    produce_started = time.perf_counter()
    sizes = _produce_both(kafka, avro_topic, json_topic)
    produce_s = time.perf_counter() - produce_started

    monkeypatch.setenv("K2_HOME", str(k2_home / "k2"))
    k2 = _k2_in_process(kafka, avro_topic)
    k2_cold = _k2_new_process(avro_topic, k2_home / "k2-new-process")

    monkeypatch.setenv("K2_HOME", str(k2_home / "peer"))
    result: dict = {
        "benchmark": "peer",
        "measured_at": datetime.now(UTC).isoformat(),
        "messages": MESSAGES,
        "partitions": PARTITIONS,
        "versions": {
            **versions(),
            "connector": "org.apache.iceberg.connect.IcebergSinkConnector",
            "connect_mode": "standalone (org.apache.kafka.connect.cli.ConnectStandalone), tasks.max=1",
        },
        "inputs": {
            "k2": f"{avro_topic}: K2's framed Avro TradeV2, {sizes['avro_bytes']} bytes of values",
            "peer": f"{json_topic}: the same trades as JSON (JsonConverter, schemas.enable=false), "
            f"{sizes['json_bytes']} bytes of values",
        },
        "produce_both_topics_s": round(produce_s, 1),
        "k2_msgs_per_s": k2["msg_s"],
        "k2": k2,
        "k2_new_process": k2_cold,
    }
    failure: dict = {}
    try:
        peer = _run_peer(kafka, json_topic, k2_home / "peer", failure, expected=k2.pop("values"))
    except PeerUnavailableError as exc:
        result.update({"status": "peer failed", "peer_error": str(exc)[-6000:], **failure})
        _write(result)
        pytest.fail(f"the Iceberg Kafka Connect sink did not run; peer.json records why:\n{exc}")
    result.update(
        {
            "status": "ok",
            "peer_msgs_per_s": peer["msg_s"],
            "peer_steady_msgs_per_s": peer["steady_msg_s"],
            "peer_rows": peer["rows"],
            "ratio": round(k2["msg_s"] / peer["msg_s"], 3),
            "ratio_to_peer_steady": round(k2["msg_s"] / peer["steady_msg_s"], 3) if peer["steady_msg_s"] else None,
            "ratio_new_process_to_peer": round(k2_cold["msg_s"] / peer["msg_s"], 3),
            "peer": {
                **peer,
                "commit_interval_ms": COMMIT_INTERVAL_MS,
                "includes": "JVM and Connect worker start, coordinator election, consume, convert, write, and "
                "commits every commit interval; ends at the commit that made 200K rows",
                "steady_rate_is": "rows committed after the first commit / time from first to last commit",
                "work_only_k2_does": "platform_sequence (the Kafka offset) and enrichment (k2.notional, k2.tier in "
                "vendor_data); the tables are otherwise equal row for row (checked)",
                "worker_settings": {
                    "offset.flush.interval.ms": COMMIT_INTERVAL_MS,
                    "why": "the sink answers its coordinator only inside put(); with the default "
                    "60 s an idle consumer blocks in poll() and commits time out",
                },
            },
        }
    )
    _write(result)
    assert peer["rows"] == peer["distinct_message_ids"] == MESSAGES
    assert not peer["values_differing_from_k2"], "the peer's table differs from K2's in the trades' values"


def _write(result: dict) -> None:
    out = PROJECT_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "peer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
