"""`k2 kafka start|stop|status`: the embedded single-node KRaft broker; `k2 kafka dead-letters`: the
dead letters of a topic, written by the streamer or the sink in one format, as JSON lines."""

from __future__ import annotations

import argparse
import json

from k2_resources.platform.kafka_broker import KafkaBroker

HELP = "start, stop or inspect the embedded Kafka broker, or read a topic's dead letters"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("kafka", help=HELP)
    parser.add_argument("action", choices=["start", "stop", "status", "dead-letters"])
    parser.add_argument("--port", type=int, help="client port (default $K2_KAFKA_PORT or 9092)")
    parser.add_argument("--controller-port", type=int, help="KRaft controller port (default 9093)")
    parser.add_argument(
        "--topic",
        default=None,
        help="dead-letters: the data topic (its <topic>.dlq is read) or the .dlq topic itself "
        "(default market.trades.binance)",
    )
    parser.add_argument("--limit", type=int, default=None, help="dead-letters: at most this many, oldest first")
    parser.set_defaults(handler=_run)


def _dead_letters(args: argparse.Namespace) -> int:
    from k2_resources.kafka.dead_letters import read_dead_letters
    from k2_resources.kafka.resource import KafkaResource
    from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC, dead_letter_topic

    topic = args.topic or BINANCE_TRADES_TOPIC
    dlq = topic if topic.endswith(".dlq") else dead_letter_topic(topic)
    for letter in read_dead_letters(KafkaResource(), dlq, limit=args.limit):
        print(json.dumps({"topic": dlq, **letter.to_dict()}, sort_keys=True))
    return 0


def _run(args: argparse.Namespace) -> int:
    if args.action == "dead-letters":
        return _dead_letters(args)
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
