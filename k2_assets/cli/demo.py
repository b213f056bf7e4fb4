"""`k2 demo [--json]`: the whole platform headless, for a bounded time, in a fresh K2_HOME.

Starts its own Kafka broker, loads the five ASX days through the real assets, streams the
bundled Binance recording once as fast as possible through the local recording server, the
WebSocket client and Kafka, drives the real stream sensor and its micro-batch runs in a real
Dagster instance until the lag is zero, checks the counts, and stops everything it started.
`k2 demo degradation` runs the degradation scenario instead; `k2 demo cluster` the scale-out one
(k2_assets.cli.cluster_demo: the local cluster topology, a broker killed mid-stream, Spark reading).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from k2_resources.errors import K2Error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="run the whole platform headless (embedded, or `cluster`: the scale-out topology), then stop"
    )
    parser.add_argument("scenario", nargs="?", choices=["platform", "degradation", "cluster"], default="platform")
    parser.add_argument("--json", action="store_true", help="end with one JSON line summarising the run")
    parser.add_argument("--home", help="K2_HOME to use (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    parser.add_argument(
        "--kill-at",
        type=float,
        help="cluster: kill the broker at this fraction of the recording's playback (0-1; default: drawn from --seed)",
    )
    parser.add_argument("--seed", type=int, help="cluster: the seed the kill point is drawn from (default: a new one)")
    parser.set_defaults(handler=_run)


# The demo prints its own progress; runs log warnings and errors only.
QUIET_RUNS = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _say(message: str) -> None:
    print(message, flush=True)


def _run(args: argparse.Namespace) -> int:
    if args.scenario == "degradation":
        from k2_assets.cli.degradation_demo import run_degradation_demo

        return run_degradation_demo(json_output=args.json, home=Path(args.home).resolve() if args.home else None)
    home = Path(args.home or tempfile.mkdtemp(prefix="k2-demo-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["K2_HOME"] = str(home)
    os.environ.pop("DAGSTER_HOME", None)
    if args.scenario == "cluster":
        return _run_cluster(home, args)
    summary = run_platform_demo(home, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(summary))
    ok = (
        summary["lag"] == 0
        and summary["binance"]["source_trades"]
        == summary["binance"]["iceberg_trades"]
        == summary["binance"]["iceberg_distinct_trade_ids"]
        and all(v == "PASSED" for v in summary["checks"].values())
    )
    return 0 if ok else 1


def _run_cluster(home: Path, args: argparse.Namespace) -> int:
    """`k2 demo cluster`: the topology's settings replace any the shell has (the demo uses its own)."""
    from k2_assets.cli.cluster_demo import KillPoint, run_cluster_demo

    if args.home is None:
        home.chmod(0o711)  # mkdtemp's 0700 would keep out Postgres, which runs as another user under root
    for name in [n for n in os.environ if n.startswith(("K2_ICEBERG_", "K2_S3_", "DAGSTER_POSTGRES_"))]:
        del os.environ[name]
    os.environ.pop("K2_KAFKA_BOOTSTRAP", None)
    for name in [n for n in os.environ if n.startswith(("K2_KAFKA_SASL_", "K2_KAFKA_SSL_"))]:
        del os.environ[name]
    for name in ("K2_KAFKA_SECURITY_PROTOCOL", "K2_KAFKA_CREDENTIALS_FILE", "K2_KAFKA_ROLE"):
        os.environ.pop(name, None)
    kill_point = KillPoint.choose(args.kill_at, args.seed)  # a bad --kill-at fails before anything starts
    summary = run_cluster_demo(home, timeout_s=args.timeout, kill_point=kill_point)
    if args.json:
        print(json.dumps(summary))
    ok = (
        summary["lag"] == 0
        and summary["brokers"] == 3
        and summary["source_trades"]
        == summary["kafka_records"]
        == summary["iceberg_trades"]
        == summary["iceberg_distinct_trade_ids"]
        and summary["streamer_undelivered"] == 0
        and summary["spark_trades"] in (None, summary["source_trades"])
        and summary["spark_ohlcv_equal"] is not False
        and (summary["kafka_security"] == "PLAINTEXT" or summary["unauthorized_produce_refused"])
        and bool(summary["checks"])
        and set(summary["checks"].values()) == {"PASSED"}  # a failed asset check fails the demo too
    )
    return 0 if ok else 1


def run_platform_demo(home: Path, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run the demo in ``home`` (already K2_HOME) and return its summary."""
    from dagster import DagsterInstance, materialize

    from k2_resources.operations.dagster_instance import prepare_instance
    from k2_resources.paths import dagster_home
    from k2_resources.platform.kafka_broker import KafkaBroker, free_port

    started = time.monotonic()
    broker = KafkaBroker(home=home / "kafka", port=free_port(), controller_port=free_port())
    _say(f"K2_HOME={home}")
    _say("starting Kafka ...")
    broker.start()
    os.environ["K2_KAFKA_BOOTSTRAP"] = broker.bootstrap_servers
    try:
        # Imported after K2_KAFKA_BOOTSTRAP is set: the resources read it when they connect.
        from k2_assets.asx.assets import ASX_ASSETS
        from k2_assets.asx.partitions import asx_trading_days
        from k2_assets.definitions import defs
        from k2_resources.binance.recording_server import RecordingServerThread
        from k2_resources.binance.streamer import stream_to_kafka
        from k2_resources.catalog.resource import IcebergResource
        from k2_resources.kafka.resource import KafkaResource
        from k2_resources.kafka.topics import BINANCE_TRADES_PARTITIONS, BINANCE_TRADES_TOPIC
        from k2_resources.query.duckdb_query import DuckDBQueryResource
        from k2_sensors.binance.driver import drive

        (dagster_home() / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        prepare_instance(dagster_home(), config=None)  # created once, before anything opens it
        checks: dict[str, str] = {}
        with DagsterInstance.from_config(str(dagster_home())) as instance:
            resources = defs.get_repository_def().get_top_level_resources()
            for day in asx_trading_days.get_partition_keys():
                result = materialize(
                    ASX_ASSETS, partition_key=day, instance=instance, resources=resources, run_config=QUIET_RUNS
                )
                if not result.success:
                    raise K2Error(f"loading ASX day {day} failed; see the Dagster run {result.run_id}")
                for evaluation in result.get_asset_check_evaluations():
                    name = f"{evaluation.asset_key.to_user_string()}.{evaluation.check_name}"
                    if checks.get(name) != "FAILED":
                        checks[name] = "PASSED" if evaluation.passed else "FAILED"
                _say(f"ASX {day} loaded")

            kafka = KafkaResource()
            kafka.ensure_topic(BINANCE_TRADES_TOPIC, partitions=BINANCE_TRADES_PARTITIONS)
            stats: dict[str, Any] = {}
            with RecordingServerThread(speed=None, loop=False) as server:

                def stream() -> None:
                    stats["stream"] = stream_to_kafka(server.url, BINANCE_TRADES_TOPIC, kafka, idle_timeout_s=30)

                streamer = threading.Thread(target=stream, name="k2-demo-streamer", daemon=True)
                streamer.start()
                _say(f"streaming the Binance recording from {server.url} ...")
                report = drive(
                    instance,
                    defs,
                    until=lambda r: not streamer.is_alive() and r.lag == 0,
                    timeout_s=max(60.0, timeout_s - (time.monotonic() - started)),
                    run_log_level="WARNING",
                )
                streamer.join(timeout=60)
                source_trades = server.stats().unique_trades
            for name, check in report.last_checks.items():
                checks[f"binance_trades.{name}"] = "PASSED" if check["passed"] else "FAILED"
            _say(f"stream sensor: {report.ticks} ticks, {report.runs} micro-batch runs, lag {report.lag}")

        counts = (
            DuckDBQueryResource(iceberg=IcebergResource())
            .query(
                "select exchange, count(*) as n, count(distinct trade_id) as ids from market.trades group by exchange"
            )
            .to_pylist()
        )
        by_exchange = {row["exchange"]: row for row in counts}
        binance = by_exchange.get("BINANCE", {"n": 0, "ids": 0})
        return {
            "asx": {"iceberg_trades": by_exchange.get("ASX", {"n": 0})["n"]},
            "binance": {
                "source_trades": source_trades,
                "iceberg_trades": binance["n"],
                "iceberg_distinct_trade_ids": binance["ids"],
                "streamer": {k: v for k, v in stats["stream"].as_dict().items() if isinstance(v, (int, str))},
            },
            "lag": report.lag,
            "checks": dict(sorted(checks.items())),
            "seconds": round(time.monotonic() - started, 1),
        }
    finally:
        _say("stopping Kafka ...")
        broker.stop()
