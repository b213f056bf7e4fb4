"""`k2 offsets show|reset`: what market.trades holds of each Kafka topic, and a new baseline."""

from __future__ import annotations

import argparse
import json

from k2_resources.errors import K2Error
from k2_resources.iceberg import IcebergResource
from k2_resources.kafka import KafkaResource
from k2_resources.topics import BINANCE_TRADES_TOPIC
from k2_resources.trades.offsets import committed_offsets, reset_baseline


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("offsets", help="show or reset the Kafka offsets market.trades has committed")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="committed offsets next to the topic's offsets")
    show.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    show.set_defaults(handler=_show)
    reset = actions.add_parser(
        "reset", help="set a new baseline after the topic or the Kafka cluster was recreated",
        description="Declare that market.trades holds the topic up to the given offsets. By default the "
        "baseline is the topic's earliest offsets, so every message now in the topic is loaded.",
    )
    reset.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    reset.add_argument("--to", choices=["earliest", "latest"], default="earliest",
                       help="earliest: load everything now in the topic (default); latest: skip it")
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.set_defaults(handler=_reset)


def _topic_offsets(kafka: KafkaResource, topic: str) -> tuple[dict[int, int], dict[int, int]]:
    from kafka import TopicPartition

    consumer = kafka.consumer()
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        if not partitions:
            raise K2Error(f"topic {topic} does not exist on {kafka.servers}; check the name with `k2 offsets show`")
        earliest = {tp.partition: o for tp, o in consumer.beginning_offsets(partitions).items()}
        latest = {tp.partition: o for tp, o in consumer.end_offsets(partitions).items()}
        return earliest, latest
    finally:
        consumer.close()


def _show(args: argparse.Namespace) -> int:
    kafka, iceberg = KafkaResource(), IcebergResource()
    earliest, latest = _topic_offsets(kafka, args.topic)
    committed = committed_offsets(iceberg.trades(), args.topic)
    rows = {str(p): {"earliest": earliest[p], "latest": latest[p], "committed": committed.get(p, 0),
                     "lag": max(0, latest[p] - committed.get(p, 0)), "mismatch": latest[p] < committed.get(p, 0)}
            for p in sorted(latest)}
    print(json.dumps({"topic": args.topic, "partitions": rows}, indent=2))
    return 0


def _reset(args: argparse.Namespace) -> int:
    kafka, iceberg = KafkaResource(), IcebergResource()
    earliest, latest = _topic_offsets(kafka, args.topic)
    baseline = earliest if args.to == "earliest" else latest
    table = iceberg.trades()
    before = committed_offsets(table, args.topic)
    if not args.yes:
        answer = input(f"market.trades committed {before} for {args.topic}; set the baseline to {baseline}? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("nothing changed")
            return 1
    dropped = reset_baseline(table, args.topic, baseline)
    print(f"baseline of {args.topic} set to {baseline} (was {before})")
    for pending in dropped:
        print(f"not recoverable: {pending.rows} deferred rows of {', '.join(pending.symbols)} in "
              f"{pending.range.key} pointed into the old topic")
    return 0
