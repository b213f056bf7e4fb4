"""Which partition of a trades topic each symbol's trades go to.

Kafka keeps order within a partition only, so all trades of one symbol must go to one partition
(the record key is the symbol). Kafka's default partitioner hashes the key (murmur2), and with
few partitions that puts the busiest symbols together: BTCUSDT and ETHUSDT both hash to
partition 2 of 3, so one micro-batch run carried both while the other partitions idled.

K2 therefore assigns the well-known symbols explicitly: the i-th symbol of ``SPREAD_SYMBOLS``
goes to partition ``i mod N`` (N partitions). With the default 6 partitions::

    BTCUSDT 0   ETHUSDT 1   BNBUSDT 2   SOLUSDT 3   XRPUSDT 4   ADAUSDT 5
    DOGEUSDT 0  TRXUSDT 1   LTCUSDT 2   LINKUSDT 3  DOTUSDT 4   AVAXUSDT 5  ...

so the bundled symbols (BTCUSDT, ETHUSDT, BNBUSDT) land in different partitions with any N >= 3,
and the busiest pairs are spread first. Any other symbol goes where Kafka's default partitioner
would put its key (murmur2, positive, mod N), so another Kafka client producing the same keys
agrees for those. The list only ever grows at its end; reordering it would move symbols.

Consumers are unaffected: the sink, the hybrid reads and the replays read every partition by
offset ranges and never assume a symbol's partition. A topic that already holds data keyed the
old way keeps it; after the switch a symbol's new trades may sit in another partition than its
old ones, which only matters to a reader that orders trades across partitions by offset (none
in K2 does: time order comes from the timestamps).
"""

from __future__ import annotations

import random
from typing import Any

from kafka.partitioner import Partitioner, murmur2

SPREAD_SYMBOLS: tuple[str, ...] = (
    "BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT",
    "DOGEUSDT", "TRXUSDT", "LTCUSDT", "LINKUSDT", "DOTUSDT", "AVAXUSDT",
    "BCHUSDT", "MATICUSDT", "ATOMUSDT", "ETCUSDT", "XLMUSDT", "UNIUSDT",
    "FILUSDT", "NEARUSDT", "APTUSDT", "ARBUSDT", "OPUSDT", "ETHBTC",
    "BNBBTC", "SOLBTC",
)  # fmt: skip
_POSITION = {symbol: index for index, symbol in enumerate(SPREAD_SYMBOLS)}


def symbol_partition(symbol: str, partitions: int) -> int:
    """The partition (0 .. partitions-1) the trades of ``symbol`` go to."""
    if partitions < 1:
        raise ValueError(f"a topic has at least one partition, got {partitions}")
    position = _POSITION.get(symbol.strip().upper())
    if position is not None:
        return position % partitions
    return (murmur2(symbol.encode("utf-8")) & 0x7FFFFFFF) % partitions


class SymbolPartitioner(Partitioner):
    """kafka-python partitioner for records keyed by symbol: ``symbol_partition`` of the key.

    Records without a key go to a random available partition, as with Kafka's default.
    """

    def partition(
        self,
        topic: str,
        key: Any,
        serialized_key: bytes | None,
        value: Any,
        serialized_value: bytes | None,
        cluster: Any,
    ) -> int:
        if topic not in cluster.topics():
            raise ValueError(f"topic {topic} not found in the cluster metadata")
        every = sorted(cluster.partitions_for_topic(topic))
        if serialized_key is None:
            available = list(cluster.available_partitions_for_topic(topic)) or every
            return random.choice(available)
        return every[symbol_partition(serialized_key.decode("utf-8", "replace"), len(every))]
