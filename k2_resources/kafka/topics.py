"""Kafka topic names of K2, defined once.

Trades from Binance go to ``market.trades.binance``; a topic's undecodable messages go to
its dead-letter topic ``<topic>.dlq``; replays of market.trades go to ``replay.trades.<label>``.
"""

from __future__ import annotations

BINANCE_TRADES_TOPIC = "market.trades.binance"
# Partitions the Binance trades topic is created with: enough for the daemon to run several
# micro-batches in parallel; symbols are spread over them by k2_resources.kafka.partitioner.
BINANCE_TRADES_PARTITIONS = 6
DEAD_LETTER_SUFFIX = ".dlq"
REPLAY_TRADES_PREFIX = "replay.trades."


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic of ``topic``."""
    return f"{topic}{DEAD_LETTER_SUFFIX}"


def replay_trades_topic(label: str) -> str:
    """The topic a replay of market.trades labelled ``label`` (e.g. a day) goes to."""
    return f"{REPLAY_TRADES_PREFIX}{label}"


BINANCE_TRADES_DLQ_TOPIC = dead_letter_topic(BINANCE_TRADES_TOPIC)
