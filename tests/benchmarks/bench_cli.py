"""Benchmark: what a user waits for at the command line, each run in a NEW process.

Writes bench-results/cli.json with the median of 5 runs (and every sample) of:

- ``k2 --help``;
- ``k2 query sql "select count(*) from market.trades"`` on demo-like data (one real ASX day
  loaded through ingest_day, Binance trades in Iceberg and in the Kafka tail);
- the first ``HybridQueryResource().recent_trades(symbol, minutes=15)`` in a fresh process:
  the call itself, and the process's import and construction before it, reported apart;

next to baselines measured in the same run: ``python -c pass`` (interpreter start-up, the floor
of any command) and ``python -c`` DuckDB counting the same Parquet files directly (no catalog, no
K2), so the ratios say what K2's own work costs.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from k2_resources.asx.files import default_data_dir
from k2_resources.asx.writes import ingest_day
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.settings import PROJECT_ROOT
from tests.support import synthetic
from tests.support.producing import produce

RUNS = 5
ASX_DAY = "2014-03-11"
KAFKA_TAIL_ROWS = 64_000  # the tail the issue measured: 64K undecoded messages after start
K2 = str(Path(sys.executable).with_name("k2"))

FIRST_RECENT_TRADES = """
import json, sys, time
started = time.perf_counter()
from k2_resources.trades.hybrid import HybridQueryResource
topic = sys.argv[1]
hybrid = HybridQueryResource(topics=[topic], topic_exchanges={topic: ["BINANCE"]})
ready = time.perf_counter()
frame = hybrid.recent_trades("BTCUSDT", minutes=15)
done = time.perf_counter()
stats = hybrid.last_stats
hybrid.close()
print(json.dumps({"import_and_construct_s": ready - started, "first_call_s": done - ready, "rows": frame.height,
                  "kafka_rows": stats.kafka_rows, "kafka_decoded": stats.kafka.fetched_messages}))
"""

# What `k2 query sql` ran before it had its own light path: the Dagster resource over pyiceberg.
RESOURCE_PATH = """
from k2_resources.duckdb_query import DuckDBQueryResource
print(DuckDBQueryResource().query("select count(*) from market.trades").column(0)[0].as_py())
"""

DUCKDB_PARQUET = """
import sys, duckdb
connection = duckdb.connect()
print(connection.execute("select count(*) from read_parquet(?)", [sys.argv[1:]]).fetchone()[0])
"""


def _run(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall seconds of one new process, and its stdout; fails the benchmark if the command fails."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, f"{command[:3]} failed: {result.stderr[-2000:]}"
    return seconds, result.stdout


def _median_of(command: list[str], env: dict[str, str]) -> tuple[dict, str]:
    samples, output = [], ""
    for _ in range(RUNS):
        seconds, output = _run(command, env)
        samples.append(seconds)
    return {"median_s": round(statistics.median(samples), 3), "samples_s": [round(s, 3) for s in samples]}, output


@pytest.mark.timeout(900)
def test_cli_latency_in_new_processes(k2_home: Path, kafka_broker, topic_name: str) -> None:
    iceberg, kafka = IcebergResource(), KafkaResource()
    asx = ingest_day(default_data_dir(), iceberg, "trades", ASX_DAY)
    now = datetime.now(timezone.utc)
    binance = synthetic.binance_trades(KAFKA_TAIL_ROWS + 20_000, now)
    iceberg.trades().append(synthetic.to_trades_arrow(binance.head(20_000)).cast(iceberg.trades().schema().as_arrow()))
    # As a live stream leaves them: each trade reached Kafka at its own time, so the message
    # timestamps follow trade time and offsets_for_times can bound a window (old timestamps: no
    # time-based retention on this topic).
    kafka.ensure_topic(topic_name, partitions=3, config={"retention.ms": "-1"})
    produce(kafka, topic_name, synthetic.to_records(binance.tail(KAFKA_TAIL_ROWS)), record_timestamps=True)
    total_rows = asx.valid + 20_000
    data_files = [task.file.file_path.removeprefix("file://") for task in iceberg.trades().scan().plan_files()]

    env = {**os.environ, "K2_HOME": str(k2_home), "PYTHONDONTWRITEBYTECODE": "1"}
    python_pass, _ = _median_of([sys.executable, "-c", "pass"], env)
    duckdb_parquet, counted = _median_of([sys.executable, "-c", DUCKDB_PARQUET, *data_files], env)
    assert int(counted.strip()) == total_rows
    help_run, help_text = _median_of([K2, "--help"], env)
    assert "query" in help_text
    sql_run, sql_text = _median_of([K2, "query", "sql", "select count(*) from market.trades", "--format", "csv"], env)
    assert sql_text.strip().splitlines()[-1] == str(total_rows)
    resource_run, resource_text = _median_of([sys.executable, "-c", RESOURCE_PATH], env)
    assert resource_text.strip() == str(total_rows)

    hybrid_runs = [json.loads(_run([sys.executable, "-c", FIRST_RECENT_TRADES, topic_name], env)[1]) for _ in range(RUNS)]
    first_calls = [run["first_call_s"] for run in hybrid_runs]
    setups = [run["import_and_construct_s"] for run in hybrid_runs]
    assert all(run["rows"] > 0 and run["kafka_rows"] > 0 for run in hybrid_runs)  # the window is in the Kafka tail

    def ratio(run: dict) -> float:
        return round(run["median_s"] / python_pass["median_s"], 2)

    report = {
        "benchmark": "cli",
        "what": f"median of {RUNS} new processes each; data: ASX {ASX_DAY} ({asx.valid} trades) and 20K Binance trades "
        f"in market.trades, {KAFKA_TAIL_ROWS} Binance trades in the Kafka tail (not committed)",
        "measured_at": datetime.now(timezone.utc).isoformat(),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "load_1m": os.getloadavg()[0]},
        "baseline_python_c_pass": python_pass,
        "baseline_duckdb_count_parquet_files": {**duckdb_parquet, "files": len(data_files)},
        "k2_help": {**help_run, "target_s": 0.3, "x_python_start": ratio(help_run)},
        "k2_query_sql_count": {**sql_run, "target_s": 1.0, "x_python_start": ratio(sql_run),
                               "x_duckdb_on_the_parquet_files": round(sql_run["median_s"] / duckdb_parquet["median_s"], 2)},
        "before_query_sql_through_duckdb_query_resource": {**resource_run, "x_python_start": ratio(resource_run)},
        "hybrid_first_recent_trades": {
            "median_s": round(statistics.median(first_calls), 3), "samples_s": [round(s, 3) for s in first_calls],
            "target_s": 0.5,
            "import_and_construct_median_s": round(statistics.median(setups), 3),
            "rows": hybrid_runs[-1]["rows"], "kafka_rows": hybrid_runs[-1]["kafka_rows"],
            "kafka_messages_decoded": hybrid_runs[-1]["kafka_decoded"],
        },
    }
    out = PROJECT_ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    (out / "cli.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
