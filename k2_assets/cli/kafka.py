"""`k2 kafka start|stop|status`: the embedded single-node KRaft broker."""

from __future__ import annotations

import argparse

from k2_resources.platform.kafka_broker import KafkaBroker


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kafka", help="start, stop or inspect the embedded Kafka broker")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--port", type=int, help="client port (default $K2_KAFKA_PORT or 9092)")
    parser.add_argument("--controller-port", type=int, help="KRaft controller port (default 9093)")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    broker = KafkaBroker.default()
    if args.port:
        broker.port = args.port
    if args.controller_port:
        broker.controller_port = args.controller_port
    if args.action == "start":
        broker.start()
        print(f"Kafka is ready on {broker.bootstrap_servers} (log: {broker.log_file})")
    elif args.action == "stop":
        broker.stop()
        print("Kafka stopped")
    else:
        print(broker.status())
        return 0 if broker.pid() is not None else 3
    return 0
