"""The operator commands, run as a user runs them: `k2 kafka start|status|stop`, `k2 offsets show`,
`k2 demo degradation`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from k2_assets.cli.degradation_demo import BURST
from k2_resources.catalog.resource import IcebergResource
from k2_resources.degradation.levels import DegradationLevel
from k2_resources.kafka.resource import KafkaResource
from k2_resources.platform.kafka_broker import free_port
from k2_resources.sink.microbatch import run_microbatch
from k2_resources.sink.offsets import OffsetRange
from tests.support.producing import produce
from tests.support.recorded import recorded_trades
from tests.support.source_ids import binance_trade_ids, recorded_binance_trades, table_trade_ids

pytestmark = pytest.mark.integration


def k2(*args: str, home: Path, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess:
    """`python -m k2_assets.cli ARGS` on ``home`` (no inherited broker or Dagster home)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("K2_KAFKA_BOOTSTRAP", "DAGSTER_HOME")}
    environment.update(K2_HOME=str(home), **env)
    return subprocess.run(
        [sys.executable, "-m", "k2_assets.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.timeout(600)
def test_k2_kafka_start_status_stop_on_a_fresh_home(tmp_path):
    home = tmp_path / "k2home"
    port, controller = free_port(), free_port()
    ports = ("--port", str(port), "--controller-port", str(controller))

    stopped = k2("kafka", "status", *ports, home=home)
    assert stopped.returncode == 3 and stopped.stdout.startswith("stopped"), stopped.stdout + stopped.stderr
    started = k2("kafka", "start", *ports, home=home)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"Kafka is ready on 127.0.0.1:{port}" in started.stdout
        status = k2("kafka", "status", *ports, home=home)
        assert status.returncode == 0 and status.stdout.startswith("running, pid") and "ready" in status.stdout
        # a real broker: a topic round trip through it
        kafka = KafkaResource(bootstrap_servers=f"127.0.0.1:{port}")
        kafka.ensure_topic("cli-check", partitions=1)
        assert kafka.end_offsets("cli-check") == {0: 0}
        assert (home / "kafka").is_dir()  # state under K2_HOME
    finally:
        stop = k2("kafka", "stop", *ports, home=home)
    assert stop.returncode == 0 and "Kafka stopped" in stop.stdout, stop.stdout + stop.stderr
    after = k2("kafka", "status", *ports, home=home)
    assert after.returncode == 3 and after.stdout.startswith("stopped")


def test_k2_offsets_show_prints_the_topics_offsets_next_to_the_committed_ones(
    k2_home, kafka_broker, topic_name, capsys
):
    from k2_assets.cli import main

    kafka, iceberg = KafkaResource(), IcebergResource()
    kafka.ensure_topic(topic_name, partitions=3)
    produce(kafka, topic_name, recorded_trades(300))  # round robin: 100 per partition
    run_microbatch(kafka, iceberg, OffsetRange(topic_name, 0, 0, 100))
    run_microbatch(kafka, iceberg, OffsetRange(topic_name, 1, 0, 40))

    assert main(["offsets", "show", "--topic", topic_name]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["topic"] == topic_name
    partitions = {
        p: {k: v[k] for k in ("earliest", "latest", "committed", "lag", "mismatch")}
        for p, v in shown["partitions"].items()
    }
    assert partitions == {
        "0": {"earliest": 0, "latest": 100, "committed": 100, "lag": 0, "mismatch": False},
        "1": {"earliest": 0, "latest": 100, "committed": 40, "lag": 60, "mismatch": False},
        "2": {"earliest": 0, "latest": 100, "committed": 0, "lag": 100, "mismatch": False},
    }

    assert main(["offsets", "show", "--topic", f"{topic_name}-missing"]) != 0
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.timeout(900)
def test_k2_demo_degradation_goes_up_the_levels_and_back_losing_nothing(tmp_path):
    started = time.monotonic()
    completed = k2(
        "demo", "degradation", "--json", "--home", str(tmp_path / "demo"), home=tmp_path / "unused", timeout_s=840
    )
    seconds = time.monotonic() - started
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])

    def level(value: int | str) -> DegradationLevel:
        return DegradationLevel[value] if isinstance(value, str) else DegradationLevel(value)

    assert level(summary["max_level"]) >= DegradationLevel.AGGRESSIVE, summary
    assert level(summary["final_level"]) == DegradationLevel.NORMAL
    assert summary["sent"] == summary["in_iceberg"] > 0
    assert len(summary["transitions"]) >= 4  # up at least to AGGRESSIVE and stepwise back down
    # Nothing lost or doubled, by ids: the burst is the recording's first trades in time order
    # (data/binance, merged by time, symbol, id), and the table holds each of them once.
    in_table = table_trade_ids(tmp_path / "demo")
    assert [key for key, n in in_table.items() if n > 1] == []  # no trade twice
    assert in_table == binance_trade_ids(recorded_binance_trades()[:BURST])
    print(
        f"\nk2 demo degradation: {seconds:.0f}s, {summary['sent']} trades, max level {level(summary['max_level']).name}"
    )
