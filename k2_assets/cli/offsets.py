"""`k2 offsets show|reset|accept-loss|gaps`: what market.trades holds of each Kafka topic, a new
baseline, the operator's acceptance of offsets Kafka retention deleted before they were committed, and
the trade-id gaps the streamer could not fill from the exchange's history (issue 25)."""

from __future__ import annotations

import argparse
import getpass
import json
from datetime import UTC, datetime

from k2_resources.binance.gap_ledger import GapLedger
from k2_resources.catalog.resource import IcebergResource
from k2_resources.errors import K2Error
from k2_resources.kafka.resource import KafkaResource
from k2_resources.kafka.topics import BINANCE_TRADES_TOPIC
from k2_resources.sink.offsets import acknowledge_losses, committed_offsets, reset_baseline, retention_losses


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("offsets", help="show or reset the Kafka offsets market.trades has committed")
    actions = parser.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="committed offsets next to the topic's offsets")
    show.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    show.set_defaults(handler=_show)
    reset = actions.add_parser(
        "reset",
        help="set a new baseline after the topic or the Kafka cluster was recreated",
        description="Declare that market.trades holds the topic up to the given offsets. By default the "
        "baseline is the topic's earliest offsets, so every message now in the topic is loaded.",
    )
    reset.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    reset.add_argument(
        "--to",
        choices=["earliest", "latest"],
        default="earliest",
        help="earliest: load everything now in the topic (default); latest: skip it",
    )
    reset.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    reset.set_defaults(handler=_reset)
    accept = actions.add_parser(
        "accept-loss",
        help="accept the retention losses recorded for a topic (turns the retention_loss check green)",
        description="Record in market.trades that an operator accepted every unacknowledged retention loss of the "
        "topic (offsets Kafka deleted before the table committed them): who, when and why, in one commit. "
        "The loss history itself stays in the table for audit.",
    )
    accept.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    accept.add_argument("--note", required=True, help="why the loss is accepted (e.g. reloaded from the source)")
    accept.add_argument("--by", default=None, help="who accepts it (default: the current user)")
    accept.set_defaults(handler=_accept_loss)
    gaps = actions.add_parser(
        "gaps",
        help="trade-id gaps the streamer could not fill (losses) and those still filling",
        description="Lists the unfilled trade-id gaps of the streamer's gap ledger "
        "(K2_HOME/binance/gaps/<topic>.jsonl): "
        "symbol, first and last missing id, how many never reached Kafka and why; with --all also the filled ones. "
        "--accept records that an operator accepted every unfilled gap and reset so far (the sequence_gaps check "
        "turns green); the entries stay in the ledger.",
    )
    gaps.add_argument("--topic", default=BINANCE_TRADES_TOPIC)
    gaps.add_argument("--all", action="store_true", help="also list the filled gaps")
    gaps.add_argument("--accept", action="store_true", help="accept the unfilled gaps and resets listed")
    gaps.add_argument("--note", default=None, help="why they are accepted (required with --accept)")
    gaps.add_argument("--by", default=None, help="who accepts them (default: the current user)")
    gaps.set_defaults(handler=_gaps)


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
    table = iceberg.trades()
    committed = committed_offsets(table, args.topic)
    rows = {}
    for p in sorted(latest):
        done = committed.get(p, 0)
        mismatch = latest[p] < done
        rows[str(p)] = {
            "earliest": earliest[p],
            "latest": latest[p],
            "committed": done,
            "lag": max(0, latest[p] - done),
            "mismatch": mismatch,
            # offsets Kafka deleted that the next micro-batch will record as lost
            "retention_gap": 0 if mismatch else max(0, earliest[p] - done),
        }
    losses = [{**loss.to_dict(), "acknowledged": loss.acknowledged} for loss in retention_losses(table, args.topic)]
    summary = GapLedger.for_topic(args.topic).summary()
    gaps = {
        "filled": summary.filled_gaps,
        "trade_ids_filled": summary.filled_ids,
        "unfilled": summary.unfilled_gaps,
        "trade_ids_unfilled": summary.unfilled_ids,
        "filling": summary.open_gaps,
        "details": "k2 offsets gaps --topic " + args.topic,
    }
    print(
        json.dumps(
            {"topic": args.topic, "partitions": rows, "retention_losses": losses, "trade_id_gaps": gaps}, indent=2
        )
    )
    return 0


def _gaps(args: argparse.Namespace) -> int:
    ledger = GapLedger.for_topic(args.topic)
    gaps, resets = ledger.states()
    listed = [e for e in gaps.values() if args.all or e["event"] not in ("filled", "absent")]
    for entry in listed:
        state = {"open": "filling", "filled": "filled", "unfilled": "UNFILLED", "absent": "absent"}[entry["event"]]
        missing = 0 if state in ("filled", "absent") else entry["ids"] - entry.get("filled", 0) - entry.get("absent", 0)
        reason = f" reason={entry['reason']}" if "reason" in entry else ""
        print(
            f"{state:8} {entry['symbol']} ids {entry['first']}-{entry['last']} ({entry['ids']} ids, "
            f"{missing} missing){reason} at {entry['at']}"
        )
    for reset in resets:
        print(f"RESET    {reset['symbol']} id {reset['id']} after {reset['high']} (never filled) at {reset['at']}")
    summary = ledger.summary()
    print(
        f"{args.topic}: {summary.unfilled_gaps} unfilled gaps ({summary.unfilled_ids} trade ids lost), "
        f"{summary.open_gaps} filling, {summary.filled_gaps} filled ({summary.filled_ids} ids), "
        f"{summary.resets} resets, {summary.absent_ids} ids absent at the source (not a loss)"
    )
    if args.accept:
        if not args.note:
            raise K2Error("--accept needs --note saying why the unfilled gaps are accepted")
        if not (summary.unfilled_gaps or summary.resets):
            print("nothing to accept")
            return 0
        by = args.by or getpass.getuser()
        ledger.accept(by, args.note)
        print(f"accepted by {by}: {summary.unfilled_gaps} unfilled gaps and {summary.resets} resets")
    return 0


def _accept_loss(args: argparse.Namespace) -> int:
    table = IcebergResource().trades()
    by = args.by or getpass.getuser()
    at = datetime.now(UTC).isoformat(timespec="seconds")
    accepted = acknowledge_losses(table, args.topic, by, args.note, at)
    if not accepted:
        print(f"no unacknowledged retention loss is recorded for {args.topic}; nothing changed")
        return 0
    for loss in accepted:
        print(f"accepted by {by}: {loss.describe()}")
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
        print(
            f"not recoverable: {pending.rows} deferred rows of {', '.join(pending.symbols)} in "
            f"{pending.range.key} pointed into the old topic"
        )
    return 0
