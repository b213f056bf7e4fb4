"""Producing V2 trade records to a Kafka topic, keeping where each one landed."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from k2_resources.kafka.resource import KafkaResource
from k2_resources.schemas import encode_trade

PARTITIONS = 3


class Produced:
    """Each produced record with its partition and offset: the truth reads are compared with."""

    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def expected(
        self, symbols, start: datetime | None, end: datetime | None, below: dict[int, int] | None = None
    ) -> list[str]:
        """message_ids a hybrid read of this window must return, in its order (time, offset, sequence, id)."""
        chosen = [
            r
            for r in self.rows
            if (symbols is None or r["symbol"] in symbols)
            and (start is None or r["timestamp"] >= start)
            and (end is None or r["timestamp"] < end)
            and (below is None or r["offset"] < below.get(r["partition"], 0))
        ]
        chosen.sort(key=lambda r: (r["timestamp"], r["offset"], r["source_sequence"], r["message_id"]))
        return [r["message_id"] for r in chosen]


def produce(
    kafka: KafkaResource,
    topic: str,
    records: list[dict],
    *,
    partitions: int | Mapping[str, int] = PARTITIONS,
    record_timestamps: bool = False,
) -> Produced:
    """Send ``records`` to ``topic`` and wait until each is acknowledged.

    ``partitions``: a count spreads the records round robin (two symbols alone would hash to few
    partitions); a mapping sends each symbol to its partition, as a keyed producer would.
    ``record_timestamps``: each message carries its trade's time as its Kafka timestamp, so that
    offsets_for_times finds it; such old messages need a topic with ``retention.ms=-1``.
    """
    producer = kafka.producer()
    futures = []
    for index, record in enumerate(records):
        partition = partitions[record["symbol"]] if isinstance(partitions, Mapping) else index % partitions
        timestamp_ms = int(record["timestamp"].timestamp() * 1000) if record_timestamps else None
        futures.append(
            producer.send(
                topic,
                key=record["symbol"].encode(),
                value=encode_trade(record),
                partition=partition,
                timestamp_ms=timestamp_ms,
            )
        )
    producer.flush()
    rows = []
    for record, future in zip(records, futures):
        metadata = future.get(timeout=30)
        rows.append({**record, "partition": metadata.partition, "offset": metadata.offset})
    producer.close()
    return Produced(rows)
