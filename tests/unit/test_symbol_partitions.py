"""Symbols are spread over a trades topic's partitions, each symbol always to the same one."""

from __future__ import annotations

import pytest
from kafka.partitioner import DefaultPartitioner

from k2_resources.binance.client import DEFAULT_SYMBOLS
from k2_resources.kafka.partitioner import SPREAD_SYMBOLS, SymbolPartitioner, symbol_partition
from k2_resources.kafka.topics import BINANCE_TRADES_PARTITIONS


class Cluster:
    """The two questions a partitioner asks of kafka-python's cluster metadata."""

    def __init__(self, topic: str, partitions: int) -> None:
        self.topic, self.count = topic, partitions

    def topics(self):
        return {self.topic}

    def partitions_for_topic(self, topic):
        return set(range(self.count))

    def available_partitions_for_topic(self, topic):
        return set(range(self.count))


@pytest.mark.parametrize("partitions", [3, 4, 6, 12])
def test_the_bundled_symbols_land_in_different_partitions(partitions):
    assert len({symbol_partition(s, partitions) for s in DEFAULT_SYMBOLS}) == len(DEFAULT_SYMBOLS)
    spread = [symbol_partition(s, partitions) for s in SPREAD_SYMBOLS[:partitions]]
    assert sorted(spread) == list(range(partitions))  # the first N well-known symbols fill every partition


def test_default_topic_puts_btc_and_eth_apart_where_murmur2_put_them_together():
    murmur = DefaultPartitioner()
    cluster = Cluster("t", 3)
    assert murmur.partition("t", None, b"BTCUSDT", None, None, cluster) == murmur.partition(
        "t", None, b"ETHUSDT", None, None, cluster
    )
    ours = SymbolPartitioner()
    assert ours.partition("t", None, b"BTCUSDT", None, None, cluster) != ours.partition(
        "t", None, b"ETHUSDT", None, None, cluster
    )
    assert len(DEFAULT_SYMBOLS) <= BINANCE_TRADES_PARTITIONS


def test_a_symbol_always_goes_to_the_same_partition_and_unknown_ones_hash_like_kafka():
    cluster = Cluster("t", 6)
    ours, kafkas = SymbolPartitioner(), DefaultPartitioner()
    for symbol in ("PEPEUSDT", "BHP", "SHIBUSDT", "X"):
        key = symbol.encode()
        assert {ours.partition("t", None, key, None, None, cluster) for _ in range(5)} == {
            kafkas.partition("t", None, key, None, None, cluster)
        }
    assert symbol_partition("btcusdt", 6) == symbol_partition("BTCUSDT", 6) == 0
    assert ours.partition("t", None, None, None, None, cluster) in range(6)  # no key: any partition
    with pytest.raises(ValueError, match="at least one partition"):
        symbol_partition("BTCUSDT", 0)
