"""`k2 metrics`: the Prometheus exporter for the whole flow (lag, level, throughput, commits, tables)."""

from __future__ import annotations

import argparse
import os
import signal
import threading

from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.metrics import K2_EXPORTER_PORT


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("metrics", help="serve Prometheus metrics of the whole flow on 127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("K2_EXPORTER_PORT", K2_EXPORTER_PORT)))
    parser.add_argument(
        "--interval", type=float, default=15.0, help="seconds between polls (match the scrape interval)"
    )
    parser.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    parser.add_argument("--once", action="store_true", help="poll once, print the metrics and exit")
    parser.set_defaults(handler=_run)


def _instance():
    from dagster import DagsterInstance

    from k2_resources.paths import dagster_home

    home = dagster_home()
    return DagsterInstance.from_config(str(home)) if (home / "dagster.yaml").exists() else None


def _run(args: argparse.Namespace) -> int:
    from k2_resources.metrics import metrics_text
    from k2_resources.operations.exporter import MetricsPoller, run_exporter

    poller = MetricsPoller(topic=args.topic, instance=_instance())
    if args.once:
        poller.poll()
        print(metrics_text(), end="")
        return 0
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"K2 metrics on http://127.0.0.1:{args.port}/metrics (every {args.interval:g}s)", flush=True)
    run_exporter(args.port, args.interval, stop, poller)
    return 0
