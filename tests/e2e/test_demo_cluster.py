"""`k2 demo cluster --json`: K2 on the local scale-out topology, end to end, as a user runs it.

A new process starts 3 Kafka brokers, SeaweedFS (S3 + Iceberg REST catalog) and Postgres in a
fresh K2_HOME, streams the bundled recording into the 6-partition Binance topic, kills a broker
with SIGKILL and restarts it, sinks into Iceberg until the lag is zero, reads with Spark, and stops
everything: every recorded trade must be in Kafka and in Iceberg exactly once, and nothing left in
the streamer's spool.

The kill lands mid-stream and at the stream's end (95% of the trades in Kafka), where the
streamer's flush and close at the end of the recording wait on the failover (k2_resources/platform/failover.py: the
close deadline outlasts fencing, election and the producer's retry).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

K2 = Path(sys.executable).parent / "k2"  # the console script, as a user runs it
RECORDED_TRADES = 37_563  # every trade of the bundled recording (data/binance/SOURCE.md)
# The demo brings its own topology: none of the shell's settings may point it elsewhere.
FOREIGN_SETTINGS = ("K2_KAFKA_BOOTSTRAP", "DAGSTER_HOME", "K2_ICEBERG_", "K2_S3_", "DAGSTER_POSTGRES_")


@pytest.fixture
def demo_home():
    """A fresh folder others may enter: as root, Postgres runs as another user and must reach its
    data under K2_HOME (pytest's own temporary folders are private to root)."""
    home = Path(tempfile.mkdtemp(prefix="k2-demo-cluster-"))
    home.chmod(0o755)
    yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.mark.parametrize("kill_at", [0.5, 0.95], ids=["mid_stream", "stream_end"])
def test_demo_cluster_loses_and_duplicates_nothing_when_a_broker_dies(demo_home, kill_at):
    env = {k: v for k, v in os.environ.items() if not k.startswith(FOREIGN_SETTINGS)}
    env["K2_HOME"] = str(demo_home / "unused")  # the demo uses --home
    completed = subprocess.run(
        [str(K2), "demo", "cluster", "--json", "--home", str(demo_home / "k2"), "--kill-at", str(kill_at)],
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    print(
        f"\ntopology started in {summary['start_seconds']}s; killed broker {summary['killed_broker']} at "
        f"{summary['killed_at_trades']} trades ({kill_at:.0%} of them in Kafka), its partitions led elsewhere "
        f"{summary['failover_seconds']}s later, the stream closed {summary['stream_closed_after_kill_seconds']}s "
        f"after the kill; restarted in {summary['broker_restart_seconds']}s; "
        f"{summary['micro_batch_runs']} micro-batches; Spark {summary.get('spark_seconds')}s; "
        f"whole demo {summary['seconds']}s"
    )

    assert summary["brokers"] == 3 and summary["replication_factor"] == 3 and summary["min_insync_replicas"] == 2
    assert summary["partitions"] == 6
    # Secured (issue 24): SASL_SSL, and a principal without the ACL could not produce to the trades topic.
    assert summary["kafka_security"] == "SASL_SSL"
    assert summary["unauthorized_produce_refused"] is True, summary.get("unauthorized_produce_error")
    assert summary["killed_broker"] in (1, 2, 3)
    assert summary["kill_at"] == kill_at and 0 < summary["killed_at_trades"] <= RECORDED_TRADES
    if kill_at < 0.9:
        assert summary["killed_at_trades"] < RECORDED_TRADES  # the kill landed mid-stream
    # Fenced and led elsewhere before the streamer's close deadline, which it met with nothing left spooled.
    # (failover_bound_seconds assumes responsive brokers; a loaded machine may exceed it, not the deadline.)
    assert summary["failover_bound_seconds"] < summary["close_timeout_seconds"]
    assert summary["failover_seconds"] < summary["close_timeout_seconds"]
    assert summary["streamer_undelivered"] == 0
    assert (summary["catalog"], summary["storage"], summary["dagster_storage"]) == ("rest", "s3", "postgres")
    assert summary["source_trades"] == RECORDED_TRADES
    assert summary["kafka_records"] == RECORDED_TRADES  # idempotent acks=all: no record twice in Kafka
    assert summary["source_trades"] == summary["iceberg_trades"] == summary["iceberg_distinct_trade_ids"]
    assert summary["spark_trades"] == summary["source_trades"], summary.get("spark_error")
    assert summary["spark_ohlcv_equal"] is True and summary["spark_ohlcv_bars"] > 0
    assert summary["lag"] == 0 and summary["failed_runs"] == 0, summary["run_errors"]
    assert summary["checks"] and set(summary["checks"].values()) == {"PASSED"}
    # Everything it started is stopped: no process still uses its folder.
    assert processes_naming(demo_home) == [], "processes left running"


def processes_naming(folder: Path) -> list[str]:
    """Command lines of running processes that name ``folder`` (from /proc)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            command = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # ended meanwhile
        if str(folder) in command:
            found.append(command[:200])
    return found
